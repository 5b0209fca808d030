"""keras-bn: batch normalization for Keras 3 that ships to edge runtimes."""

__version__ = "0.1.0"
