"""The committed int8 detectors: `.tflite` files, `manifest.json` and a model card each."""
