"""aded: lossless, training-free speculative decoding with model-free draft trees."""

__version__ = "0.1.0"
