"""The package version, in a leaf module so that any layer (the corpus writer records it) can read it."""

__version__ = "0.1.0"
