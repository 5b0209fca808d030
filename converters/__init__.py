"""The keras-bn converter: fold BatchNormalization, export to ONNX, validate."""
