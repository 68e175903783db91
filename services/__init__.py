"""meshserve: a model-serving mesh."""

__version__ = "0.1.0"
