"""The types every reader shares: `Chunk`, `PatchBatch`, the `PatchDataset` protocol, `meta` tables.

A `Chunk` holds only plain values (paths as strings, patch names, a row-group number), never an
open handle, so chunks and datasets pickle cleanly into worker processes. Readers import this module,
never the registry in `rsretrieve.datasets`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa

from rsretrieve.bands import PATCH_SIZE, Modality
from rsretrieve.labels import CLASSES, multi_hot
from rsretrieve.pixels import RawPixels

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
    row_group: int = -1  # Major TOM: the row group (= one tile) in the shard (planned chunks: their first tile's)
    n_patches: int = 0  # patches this chunk yields when none is bad
    # Major TOM planned from metadata.parquet: several tiles of one shard, their rows (one row per
    # row group), their "<product_id>/<tile key>" and the tile side (px) their windows were counted for
    row_groups: tuple[int, ...] = ()
    tiles: tuple[str, ...] = ()
    tile_size: int = 0


@dataclass
class PatchBatch:
    pixels: RawPixels  # raw values (S2 uint16 DN, S1 float32 dB) at native sizes; never NaN
    patch_ids: list[str]
    meta: pa.Table  # one row per patch in `pixels`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, one-line reason)
    converted: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, what the reader converted), e.g. int16 S1

    def __len__(self) -> int:
        return len(self.patch_ids)


class PatchRows(Protocol):
    """One row per patch, in chunk order, read a slice at a time: a `pa.Table`, or a reader's lazy
    table for archives whose patch list is too long to hold (`majortom_windows.PlannedWindows`)."""

    num_rows: int

    def slice(self, offset: int = 0, length: int | None = None) -> pa.Table: ...


@runtime_checkable
class PatchDataset(Protocol):
    name: str

    def chunks(self, modality: Modality) -> list[Chunk]: ...

    def read_chunk(self, chunk: Chunk) -> PatchBatch: ...

    def metadata(self, modality: Modality, locations: bool = True) -> pa.Table: ...

    def patch_rows(self, modality: Modality) -> PatchRows:
        """The patches a store is created with (no lat/lon: the readers add them as they read)."""
        ...


def patches_fingerprint(chunks: list[Chunk]) -> str:
    """SHA-256 of the patches a list of chunks yields, in order: their names where chunks list them
    (BigEarthNet), else the file name, row group and count they come from (Major TOM), and for
    chunks planned from metadata their rows and tiles. A store records it, so that other data of
    the same size is never taken for the data it holds."""
    digest = hashlib.sha256()
    for chunk in chunks:
        parts = chunk.patch_ids or (Path(chunk.path).name, str(chunk.row_group), str(chunk.n_patches))
        if chunk.row_groups:
            parts = (*parts, ",".join(map(str, chunk.row_groups)), *chunk.tiles)
        digest.update("\x1f".join(parts).encode() + b"\x1e")
    return digest.hexdigest()


def meta_table(columns: dict[str, list]) -> pa.Table:
    """A `meta` table from column lists, with the contract's types and column order."""
    names = [c for c in META_TYPES if c in columns]
    return pa.table({c: pa.array(columns[c], type=META_TYPES[c]) for c in names})


def empty_batch(modality: Modality, columns: list[str], skipped=None) -> PatchBatch:
    return PatchBatch(
        pixels=RawPixels.empty(modality, PATCH),
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
