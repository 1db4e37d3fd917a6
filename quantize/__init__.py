"""edgeline.quantize."""
