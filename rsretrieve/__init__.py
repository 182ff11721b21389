"""rsretrieve: content-based image retrieval for Sentinel-1 / Sentinel-2 with CSMoE embeddings.

    import rsretrieve
    model = rsretrieve.load_model("csmoe-p16")            # or a checkpoint path
    ds = rsretrieve.open_dataset("sample")                 # BigEarthNet-v2 / Major TOM readers
    archive = rsretrieve.Archive.open(store_path, indexes_dir)
    results = archive.query_tiles(["a.tif", "b.tif"], target="s2", k=10)   # or archive.query_ids([...])
    df = rsretrieve.results_to_dataframe(results)                        # one row per (query, rank)
    scores = rsretrieve.evaluate(store_path, k=10)

The public names load on first use, so `import rsretrieve` stays fast (no torch, faiss or zarr).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("rsretrieve")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+src"

# public name -> the module that defines it
_API: dict[str, str] = {
    "load_model": "rsretrieve.models",
    "create_model": "rsretrieve.models",
    "get_config": "rsretrieve.models",
    "list_models": "rsretrieve.models",
    "save_model": "rsretrieve.models",
    "open_dataset": "rsretrieve.datasets",
    "list_datasets": "rsretrieve.datasets",
    "sample_root": "rsretrieve.datasets",
    "EmbeddingStore": "rsretrieve.store",
    "EmbeddingIndex": "rsretrieve.retrieval",
    "Archive": "rsretrieve.retrieval",
    "QueryResult": "rsretrieve.retrieval",
    "QueryResults": "rsretrieve.retrieval.results",
    "Hit": "rsretrieve.retrieval.results",
    "results_to_dataframe": "rsretrieve.retrieval.results",
    "save_results": "rsretrieve.retrieval.results",
    "collect_queries": "rsretrieve.retrieval.inputs",
    "evaluate": "rsretrieve.retrieval",
    "Workspace": "rsretrieve.workspace",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from rsretrieve.datasets import list_datasets, open_dataset, sample_root
    from rsretrieve.models import create_model, get_config, list_models, load_model, save_model
    from rsretrieve.retrieval import Archive, EmbeddingIndex, QueryResult, evaluate
    from rsretrieve.retrieval.inputs import collect_queries
    from rsretrieve.retrieval.results import Hit, QueryResults, results_to_dataframe, save_results
    from rsretrieve.store import EmbeddingStore
    from rsretrieve.workspace import Workspace


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'rsretrieve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
