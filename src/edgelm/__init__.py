"""edgelm: run small and large language models locally and decide, with numbers, which to use."""

__version__ = "0.1.0"
