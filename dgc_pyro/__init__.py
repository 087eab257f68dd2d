"""dgc_pyro: deep generative classification for imbalanced data, as a Pyro program."""

__version__ = "0.1.0"
