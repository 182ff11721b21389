"""How a store group lies on disk: its arrays, their chunks and Zarr v3 shards.

At 10^8 patches one Zarr file per chunk of rows would be millions of files. The per-patch arrays
are therefore sharded (the Zarr v3 `sharding_indexed` codec: many inner chunks in one file, with
an index of byte ranges at its end):

- `embedding` (patch, dim): shards of about `SHARD_BYTES` (32 MiB; ~21,800 rows of 768 float16),
  inner chunks of `INNER_ROWS` rows, **uncompressed** (embeddings barely compress, and a plain
  layout lets `RowReader` fetch any row with one read at an offset the shard index gives).
- `valid`, `lat`, `lon` (patch): one inner chunk per embedding shard (a flush of the writer
  rewrites exactly one), about 2^20 rows per shard file.
- string and time coordinates (and labels): shards of about 2^20 rows, inner chunks of 16,384 (a
  query's hits decode a few small inner chunks, not whole files), written once, at creation or
  when the archive grows.
- the ledger (chunk): chunks of `LEDGER_CHUNK` entries.

Every chunk (inside shards too) ends with a CRC32C that zarr checks on each read (`store.checksum`);
`embedding_crc` holds one per row besides, since `RowReader` reads single rows without zarr.

10 M rows of 768 float16 come to ~460 embedding shards and some 60 other files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import xarray as xr

from rsretrieve.labels import CLASSES, multi_hot

SHARD_BYTES = 32 * 2**20
INNER_ROWS = 256
ROWS_PER_FILE = 2**20  # per-patch 1-D arrays and coordinates
LEDGER_CHUNK = 65_536
COORD_INNER_ROWS = 16_384  # a hit's coordinates decode one inner chunk of this many rows
SLAB_ROWS = 1_000_000  # coordinates are made (as Python objects) and written this many rows at a time

STRING_COORDS = ("patch_id", "pair_id", "split", "country", "grid_cell", "product_id")
FLOAT_COORDS = ("lat", "lon")
PER_PATCH_ARRAYS = ("embedding", "valid", "embedding_crc", "lat", "lon")  # written by `ShardWriter` after creation
ROW_CHECKSUM = "embedding_crc"  # a coordinate: each row's CRC32C, for reads of single rows (`store.rows`)
NOT_NORMALISED = ("the model's output as it is, not L2-normalised: L2-normalise each row before cosine "
                  "similarity (inner product), as rsretrieve's FAISS indexes do (rsretrieve.store.normalise_rows)")


@dataclass(frozen=True)
class ChunkSpan:
    """A data chunk's place in the store: rows [start, stop)."""

    key: str
    start: int
    stop: int


def _round_up(n: int, step: int) -> int:
    return max(step, -(-n // step) * step)


def embedding_grid(n_rows: int, dim: int, itemsize: int) -> tuple[int, int]:
    """(inner chunk rows, shard rows) of the embedding array of a group of `n_rows` rows."""
    inner = min(INNER_ROWS, max(1, n_rows))
    shard = max(inner, (SHARD_BYTES // (dim * itemsize)) // inner * inner)
    return inner, min(shard, _round_up(n_rows, inner))


def row_grid(n_rows: int, shard_rows: int) -> tuple[int, int]:
    """(inner chunk rows, shard rows) of a per-patch 1-D array: an inner chunk per embedding shard."""
    per_file = max(1, ROWS_PER_FILE // shard_rows)
    return shard_rows, min(shard_rows * per_file, _round_up(n_rows, shard_rows))


def encoding(n_rows: int, dim: int, dtype: str, names: Sequence[str], n_chunks: int) -> dict:
    """xarray's `encoding` for `to_zarr`: chunks, shards and codecs of every array of a new group.
    Every chunk ends with a CRC32C (`store.checksum`): embeddings as they are, the rest zstd first."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    inner, shard = embedding_grid(n_rows, dim, np.dtype(dtype).itemsize)
    row_inner, row_shard = row_grid(n_rows, shard)
    coord_inner = min(max(1, n_rows), COORD_INNER_ROWS)
    coord = {"chunks": (coord_inner,), "shards": (min(ROWS_PER_FILE // coord_inner * coord_inner, _round_up(n_rows, coord_inner)),)}
    out: dict = {"embedding": {"chunks": (inner, dim), "shards": (shard, dim), "compressors": (Crc32cCodec(),)}}
    for name in names:
        if name != "embedding":
            out[name] = {"compressors": (ZstdCodec(level=0), Crc32cCodec())}
        if name in ("valid", ROW_CHECKSUM, *FLOAT_COORDS):
            out[name].update(chunks=(row_inner,), shards=(row_shard,))
        elif name in STRING_COORDS:
            out[name].update(coord)
        elif name == "timestamp":  # fixed units: rows appended later (`grow`) are encoded the same way
            out[name].update(coord, units="milliseconds since 1970-01-01", dtype="int64")
        elif name == "labels":
            out[name].update(chunks=(coord_inner, len(CLASSES)), shards=(coord["shards"][0], len(CLASSES)))
        elif name.startswith("chunk_"):
            out[name].update(chunks=(min(max(1, n_chunks), LEDGER_CHUNK),))
    return out


def skeleton(meta: pa.Table, spans: Sequence, dim: int, dtype: str, total_rows: int | None = None,
             total_chunks: int | None = None) -> tuple[xr.Dataset, dict]:
    """The lazily-filled Dataset of a new group and its encoding: coordinates written now,
    embeddings shard by shard later. `meta` and `spans` may be the first slab of a larger group
    (`total_rows` rows in `total_chunks` chunks), whose size then sets the layout."""
    import dask.array as da

    n = meta.num_rows
    if spans and spans[-1].stop != n:
        raise ValueError(f"chunks cover {spans[-1].stop} rows but metadata has {n}")
    total_rows = n if total_rows is None else total_rows
    coords: dict = {"label": ("label", np.array(CLASSES, dtype=object))}
    coords.update(patch_coords(meta))
    coords.update(ledger(spans))
    _, shard = embedding_grid(total_rows, dim, np.dtype(dtype).itemsize)
    coords[ROW_CHECKSUM] = ("patch", np.zeros(n, np.uint32), {"description": "CRC32C of each row of `embedding` as stored "
                                                                           "(little-endian bytes): single-row reads check it"})
    data = {
        "embedding": (("patch", "dim"), da.full((n, dim), np.nan, dtype=dtype, chunks=(shard, dim)),
                      {"normalised": False, "description": "retrieval embedding, NaN where not encoded", "comment": NOT_NORMALISED}),
        "valid": (("patch",), da.zeros(n, dtype=bool, chunks=row_grid(total_rows, shard)[1]), {"description": "encoded and usable"}),
    }
    dataset = xr.Dataset(data, coords=coords)
    chosen = encoding(total_rows, dim, dtype, list(dataset.variables), total_chunks or len(spans))
    if "timestamp" in chosen and not np.issubdtype(dataset["timestamp"].dtype, np.datetime64):
        chosen["timestamp"] = {k: chosen["timestamp"][k] for k in ("chunks", "shards", "compressors")}  # unparsed times stay strings
    return dataset, chosen


def patch_coords(meta: pa.Table) -> dict:
    """The per-patch coordinates of a metadata table (those it has), as xarray (dims, values)."""
    n = meta.num_rows
    coords: dict = {}
    columns = set(meta.column_names)
    for name in STRING_COORDS:
        if name in columns:
            values = meta[name].to_pylist()
            coords[name] = ("patch", np.array(["" if v is None else str(v) for v in values], dtype=object))
    for name in FLOAT_COORDS:
        if name in columns:
            coords[name] = ("patch", np.array([np.nan if v is None else v for v in meta[name].to_pylist()], dtype="float64"))
    if "timestamp" in columns:
        coords["timestamp"] = ("patch", timestamps(meta["timestamp"]))
    if "labels" in columns:
        coords["labels"] = (("patch", "label"), np.stack([multi_hot(v or []) for v in meta["labels"].to_pylist()]) if n else np.zeros((0, len(CLASSES)), bool))
    return coords


def ledger(spans: Sequence) -> dict:
    """The resumability ledger, as coordinates on `chunk`: bookkeeping, not data. No data variable
    uses the `chunk` dim, so xarray lists them in the group's "coordinates" attribute; the arrays
    keep their names and paths (`integrity`, `ledger`, the writer read them with zarr)."""
    return {
        "chunk_key": ("chunk", np.array([s.key for s in spans], dtype=object), {"description": "data chunk key"}),
        "chunk_start": ("chunk", np.array([s.start for s in spans], dtype="int64"), {"description": "first row of the chunk"}),
        "chunk_stop": ("chunk", np.array([s.stop for s in spans], dtype="int64"), {"description": "row after the chunk's last"}),
        "chunk_done": ("chunk", np.zeros(len(spans), dtype=bool), {"description": "chunk encoded and written"}),
        "chunk_valid": ("chunk", np.full(len(spans), -1, dtype="int64"),
                        {"description": "patches the chunk encoded when it was marked done (-1: not done)"}),
    }


def timestamps(column: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return column.cast(pa.timestamp("ms")).to_numpy(zero_copy_only=False).astype("datetime64[ms]")
    values = [None if v is None else str(v) for v in column.to_pylist()]
    try:
        return np.array([np.datetime64(v, "ms") if v else np.datetime64("NaT", "ms") for v in values])
    except ValueError:
        return np.array(["" if v is None else v for v in values], dtype=object)


def storage_rows(array) -> int:
    """Rows per file of a Zarr array: its shard's, or (unsharded, older stores) its chunk's."""
    return int((array.shards or array.chunks)[0])
