"""edgeline.host."""
