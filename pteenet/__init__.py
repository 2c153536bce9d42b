"""pteenet: retrofit early exits onto pretrained image classifiers."""

__version__ = "0.1.0"
