"""Datasets as lists of independent, picklable chunks, and the registry that opens them by name.

    ds = open_dataset("sample")                       # the bundled real BigEarthNet-v2 sample
    for chunk in ds.chunks("s2"):
        batch = ds.read_chunk(chunk)                  # safe in a worker process
        batch.pixels  # (B, 10, 120, 120) float32, normalised; batch.skipped: bad patches

The registry maps a dataset name to `"module:Class"` and default options; a reader module is
imported only when its dataset is opened (readers never import this module). Other packages add
datasets through the `rsretrieve.datasets` entry-point group (a `DatasetEntry` each); rsretrieve's
own are registered the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from rsretrieve.datasets.base import META_TYPES, PATCH, Chunk, PatchBatch, PatchDataset, empty_batch, label_matrix, meta_table, patches_fingerprint
from rsretrieve.errors import RSRetrieveError
from rsretrieve.io.entry_points import EntryPointRegistry
from rsretrieve.io.remote import as_location


@dataclass(frozen=True)
class DatasetEntry:
    """How to open a registered dataset: its reader class and what it needs."""

    target: str  # "module:Class", imported on first use
    needs_root: str = ""  # the one-line hint when no root is given ("" = the root is optional)
    defaults: dict = field(default_factory=dict)
    takes_subset: bool = True
    remote: bool = False  # whether the root may be a URL (s3://, https://, hf://, any fsspec protocol)


# the bundled archive holds all 24 real pairs; `eval sample` keeps the paper's exclusion of
# snowy/cloudy patches through the `sample` subset's pair list
SAMPLE = DatasetEntry("rsretrieve.datasets.benv2:BENv2Dataset",
                      defaults={"source": "tree", "include_snow_cloud": True, "dataset_name": "sample"})
BENV2 = DatasetEntry("rsretrieve.datasets.benv2:BENv2Dataset",
                     needs_root="a dataset root is needed (the BigEarthNet-v2 folder or its LMDB)")
MAJORTOM = DatasetEntry("rsretrieve.datasets.majortom:MajorTOMDataset",
                        needs_root="a dataset root is needed (folder with Core-S2L2A/ or Core-S1RTC/)", takes_subset=False, remote=True)


def _add_dataset(registry: dict, name: str, entry) -> None:
    if not isinstance(entry, DatasetEntry):
        raise TypeError(f"expected an rsretrieve.datasets.DatasetEntry, got {type(entry).__name__}")
    registry[name.lower()] = entry


# the registered datasets: rsretrieve's own and those installed packages declare in the
# `rsretrieve.datasets` entry-point group (`rsretrieve.io.entry_points`), loaded on first use
DATASETS = EntryPointRegistry("rsretrieve.datasets", _add_dataset, lambda: [("sample", SAMPLE), ("benv2", BENV2), ("majortom", MAJORTOM)])


def sample_root() -> Path:
    """The bundled real sample (BigEarthNet-v2 release layout + Major TOM shards), package data."""
    return Path(__file__).resolve().parent.parent / "data" / "sample"


def list_datasets() -> list[str]:
    return list(DATASETS)


def open_dataset(name: str, root: Path | str | None = None, subset: str | None = None, **options) -> PatchDataset:
    """`sample` (bundled; root optional), `benv2` (root: release tree or rico-hdl LMDB, with
    metadata.parquet) or `majortom` (root: folder with Core-S2L2A/ and/or Core-S1RTC/, or its URL:
    `s3://`, `gs://`, `https://`, `hf://`, any fsspec protocol; docs/DATASETS.md).

    BENv2 options: source ("auto"|"tree"|"lmdb"), split (str or list), include_snow_cloud (False),
    chunk_size (256), metadata (path to metadata.parquet), tree_root (for lat/lon with an LMDB).
    Major TOM options: patch_size (120), windows ("majortom" | "grid"), tile_size (the tile side in
    pixels: with the collection's metadata.parquet it replaces the nominal 1068 / `tile_px`; without
    it, each tile's header still gives the georeference), and, with metadata.parquet only, the
    filters cells (grid cell names), bbox (min_lon, min_lat, max_lon, max_lat of the tile centre),
    dates (first, last ISO day, inclusive), max_nodata (a fraction); pass tuples (docs/DATASETS.md)."""
    key = name.lower()
    entry = DATASETS.get(key)
    if entry is None:
        raise RSRetrieveError(f"{name}: unknown dataset; expected {', '.join(repr(n) for n in DATASETS)}")
    if root is None and entry.needs_root:
        raise RSRetrieveError(f"{key}: {entry.needs_root}")
    if not entry.takes_subset and subset not in (None, "", "all"):
        raise RSRetrieveError(f"{key}: named subsets apply to BigEarthNet-v2 only, got {subset!r}")
    # a URL stays a string (one that went through pathlib.Path, `s3:/bucket/key`, is mended)
    location = as_location(root) if root else None
    if isinstance(location, str) and not entry.remote:
        raise RSRetrieveError(f"{key}: remote roots are not supported yet; copy the data or use Major TOM")
    module, cls = entry.target.split(":")
    reader = getattr(importlib.import_module(module), cls)
    kwargs = {**entry.defaults, **options}
    if key == "sample":
        return reader(location or sample_root(), subset=subset or "sample", **kwargs)
    if entry.takes_subset:
        kwargs["subset"] = subset
    return reader(location, **kwargs)


__all__ = [
    "DATASETS",
    "META_TYPES",
    "PATCH",
    "Chunk",
    "DatasetEntry",
    "PatchBatch",
    "PatchDataset",
    "empty_batch",
    "label_matrix",
    "list_datasets",
    "meta_table",
    "open_dataset",
    "patches_fingerprint",
    "sample_root",
]
