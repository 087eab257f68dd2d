"""dgc_pyro: deep generative classification for imbalanced data, as a Pyro program."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that ``import dgc_pyro`` stays light (no imbalanced-learn/scikit-learn import).
    if name == "DGCSampler":
        from dgc_pyro.sampler import DGCSampler

        return DGCSampler
    raise AttributeError(f"module 'dgc_pyro' has no attribute {name!r}")
