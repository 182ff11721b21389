"""rsretrieve: content-based image retrieval for Sentinel-1 / Sentinel-2 with CSMoE embeddings."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rsretrieve")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"


def load_model(name_or_path: str, device: str = "cpu"):
    """A CSMoE/CSMAE encoder from a registered config name (random init) or a checkpoint path."""
    from rsretrieve.checkpoint import load_model as _load

    return _load(name_or_path, device=device)


__all__ = ["__version__", "load_model"]
