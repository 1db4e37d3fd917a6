"""edgeline.hil."""
