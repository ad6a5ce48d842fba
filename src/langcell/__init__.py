"""langcell: language-cell pre-training for cell identity."""

__version__ = "0.1.0"
