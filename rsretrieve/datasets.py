"""Datasets as lists of independent, picklable chunks (docs/ARCHITECTURE.md, "Readers").

    ds = open_dataset("sample", None, None)          # the bundled real BigEarthNet-v2 sample
    for chunk in ds.chunks("s2"):
        batch = ds.read_chunk(chunk)                  # safe in a worker process
        batch.pixels  # (B, 10, 120, 120) float32, normalised; batch.skipped: bad patches

A `Chunk` holds only plain values (paths as strings, patch names, a row-group number), never an
open handle, so chunks and datasets pickle cleanly into worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from rsretrieve.bands import PATCH_SIZE, Modality, bands_for
from rsretrieve.errors import RSRetrieveError
from rsretrieve.labels import CLASSES, multi_hot

PATCH = PATCH_SIZE  # kept as a name: the readers import it from here

# Types of the `meta` columns, in this order; a source writes the subset it has.
META_TYPES: dict[str, pa.DataType] = {
    "patch_id": pa.string(),
    "pair_id": pa.string(),
    "split": pa.string(),
    "country": pa.string(),
    "labels": pa.list_(pa.string()),
    "lat": pa.float64(),
    "lon": pa.float64(),
    "grid_cell": pa.string(),
    "timestamp": pa.timestamp("ms"),
    "product_id": pa.string(),
    "window": pa.list_(pa.int32()),
    "source_patch_id": pa.string(),  # Major TOM shards of the bundled sample only (an addition)
}


@dataclass(frozen=True)
class Chunk:
    dataset: str  # "benv2" | "majortom" | "sample"
    key: str  # unique and stable, e.g. "benv2:s2:000017", "majortom:s2:<shard>:rg12"
    modality: Modality
    source: str = ""  # "tree" | "lmdb" | "majortom"
    path: str = ""  # BENv2: data root (tree root or LMDB folder); Major TOM: the shard file
    patch_ids: tuple[str, ...] = ()  # BENv2: the patch names (S2 patch_id / S1 s1_name) to read
    row_group: int = -1  # Major TOM: the row group (= one tile) in the shard
    n_patches: int = 0  # patches this chunk yields when none is bad


@dataclass
class PatchBatch:
    pixels: np.ndarray  # (B, C, 120, 120) float32, normalised; never contains NaN
    patch_ids: list[str]
    meta: pa.Table  # one row per patch in `pixels`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, one-line reason)

    def __len__(self) -> int:
        return len(self.patch_ids)


@runtime_checkable
class PatchDataset(Protocol):
    name: str

    def chunks(self, modality: Modality) -> list[Chunk]: ...

    def read_chunk(self, chunk: Chunk) -> PatchBatch: ...

    def metadata(self, modality: Modality) -> pa.Table: ...


def meta_table(columns: dict[str, list]) -> pa.Table:
    """A `meta` table from column lists, with the contract's types and column order."""
    names = [c for c in META_TYPES if c in columns]
    return pa.table({c: pa.array(columns[c], type=META_TYPES[c]) for c in names})


def empty_batch(modality: Modality, columns: list[str], skipped=None) -> PatchBatch:
    return PatchBatch(
        pixels=np.zeros((0, len(bands_for(modality)), PATCH, PATCH), np.float32),
        patch_ids=[],
        meta=meta_table({c: [] for c in columns}),
        skipped=list(skipped or []),
    )


def label_matrix(meta: pa.Table) -> np.ndarray:
    """(N, 19) bool multi-hot labels of a meta table's `labels` column, in `labels.CLASSES` order."""
    if "labels" not in meta.column_names:
        return np.zeros((meta.num_rows, len(CLASSES)), dtype=bool)
    rows = meta.column("labels").to_pylist()
    if not rows:
        return np.zeros((0, len(CLASSES)), dtype=bool)
    return np.stack([multi_hot(r or []) for r in rows])


def sample_root() -> Path:
    """The bundled real sample (BigEarthNet-v2 release layout + Major TOM shards)."""
    return Path(__file__).resolve().parent / "data" / "sample"


def open_dataset(name: str, root: Path | str | None = None, subset: str | None = None, **options) -> PatchDataset:
    """`sample` (bundled; root optional), `benv2` (root: release tree or rico-hdl LMDB, with
    metadata.parquet) or `majortom` (root: folder with Core-S2L2A/ and/or Core-S1RTC/).

    BENv2 options: source ("auto"|"tree"|"lmdb"), split (str or list), include_snow_cloud (False),
    chunk_size (256), metadata (path to metadata.parquet), tree_root (for lat/lon with an LMDB).
    Major TOM options: patch_size (120), tile_size (the tile side in pixels, e.g. 1068: `chunks` and
    `metadata` then take the size from it instead of each tile's header; the header of one band
    cell per tile is still read, never its pixels, for the georeference (lat/lon))."""
    key = name.lower()
    if key == "sample":
        from rsretrieve.benv2 import BENv2Dataset

        options.setdefault("source", "tree")
        # the bundled archive holds all 24 real pairs; `eval sample` keeps the paper's exclusion
        # of snowy/cloudy patches through the `sample` subset's pair list
        options.setdefault("include_snow_cloud", True)
        return BENv2Dataset(Path(root) if root else sample_root(), subset=subset or "sample", dataset_name="sample", **options)
    if key == "benv2":
        from rsretrieve.benv2 import BENv2Dataset

        if root is None:
            raise RSRetrieveError("benv2: a dataset root is needed (the BigEarthNet-v2 folder or its LMDB)")
        return BENv2Dataset(Path(root), subset=subset, **options)
    if key == "majortom":
        from rsretrieve.majortom import MajorTOMDataset

        if root is None:
            raise RSRetrieveError("majortom: a dataset root is needed (folder with Core-S2L2A/ or Core-S1RTC/)")
        if subset not in (None, "", "all"):
            raise RSRetrieveError(f"majortom: named subsets apply to BigEarthNet-v2 only, got {subset!r}")
        return MajorTOMDataset(Path(root), **options)
    raise RSRetrieveError(f"{name}: unknown dataset; expected 'sample', 'benv2' or 'majortom'")
