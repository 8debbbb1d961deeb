"""influence: find visual families across artists, movements and eras in a painting collection."""

__version__ = "0.1.0"
