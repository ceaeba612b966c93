"""LineWatch runtime package (import name ``service``)."""

__version__ = "0.1.0"
