"""Random access to a store group's embedding rows, for re-ranking an approximate index's shortlist.

    reader = RowReader(store.path / "s2")
    vectors = reader.read(np.array([17, 3, 17, 9_000_000]))   # (4, dim) float32, in the order asked

Rows may come in any order and repeat; each distinct row is read once. A store written by
rsretrieve keeps `embedding` in uncompressed Zarr v3 shards (`store.layout`): a row is then one
read of `dim * itemsize` bytes at the offset the shard's index gives (the index, 16 bytes per inner
chunk at the end of the file, is read once per shard). A thousand queries with 100 candidates each
are 100,000 such reads, a fraction of a second from the page cache. Any other layout (compressed,
unsharded, older stores) is read through zarr.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from rsretrieve.errors import StoreError, located

EMPTY = np.uint64(2**64 - 1)  # the sharding index's mark of an inner chunk never written


class RowReader:
    """Reads arbitrary rows of `<group>/embedding` as float32 (NaN for rows never written)."""

    def __init__(self, group_path: str | Path):
        self.path = Path(group_path)
        try:
            self.array = zarr.open_array(self.path / "embedding", mode="r", zarr_format=3)
        except Exception as exc:  # noqa: BLE001 — any unreadable metadata is one line
            raise StoreError(located(self.path / "embedding", f"unreadable embedding array ({' '.join(str(exc).split())[:120]})")) from None
        self.n_rows, self.dim = (int(s) for s in self.array.shape)
        self._plain = _plain_sharding(self.array)
        self._indexes: dict[int, np.ndarray | None] = {}

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if rows.min() < 0 or rows.max() >= self.n_rows:
            raise IndexError(f"rows must lie in [0, {self.n_rows}), got {rows.min()}..{rows.max()}")
        distinct, inverse = np.unique(rows, return_inverse=True)
        block = self._read_plain(distinct) if self._plain else self._read_zarr(distinct)
        return block[inverse]

    def _read_zarr(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array.get_orthogonal_selection((rows, slice(None))), dtype=np.float32)

    def _read_plain(self, rows: np.ndarray) -> np.ndarray:
        """Rows gathered from each shard file mapped into memory for this call only (vectorised; the
        mapping is dropped after, so the pages read do not stay in the process's resident set)."""
        shard_rows, inner_rows = self._plain
        row_bytes = self.dim * self.array.dtype.itemsize
        out = np.full((rows.size, self.dim), np.nan, dtype=np.float32)
        shards = rows // shard_rows
        order = np.argsort(shards, kind="stable")
        bounds = np.flatnonzero(np.diff(shards[order])) + 1
        for at in np.split(order, bounds):
            shard = int(shards[at[0]])
            index = self._shard_index(shard)
            if index is None:
                continue
            local = rows[at] - shard * shard_rows
            offsets = index[local // inner_rows, 0]
            written = offsets != EMPTY
            if not written.any():
                continue
            # inner chunks hold whole rows back to back, so every offset is a whole number of rows
            first_row = offsets[written].astype(np.int64) // row_bytes + local[written] % inner_rows
            path = self._shard_file(shard)
            n_rows = (path.stat().st_size - self._index_bytes()) // row_bytes
            mapped = np.memmap(path, dtype=self.array.dtype, mode="r", shape=(n_rows, self.dim))
            out[at[written]] = mapped[first_row]
            del mapped
        return out

    def _index_bytes(self) -> int:
        shard_rows, inner_rows = self._plain
        return -(-shard_rows // inner_rows) * 16 + 4  # uint64 (offset, nbytes) per inner chunk, then a CRC32C

    def _shard_file(self, shard: int) -> Path:
        key = self.array.metadata.chunk_key_encoding.encode_chunk_key((shard, 0))
        return self.path / "embedding" / key

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """(inner chunks, 2) offsets and lengths of a shard's inner chunks (None: no shard file)."""
        if shard not in self._indexes:
            shard_rows, inner_rows = self._plain
            n_inner = -(-shard_rows // inner_rows)
            size = self._index_bytes()
            path = self._shard_file(shard)
            try:
                with open(path, "rb") as f:
                    f.seek(-size, os.SEEK_END)
                    raw = f.read(size)
            except FileNotFoundError:
                self._indexes[shard] = None
                return None
            except OSError as exc:
                raise StoreError(located(path, f"unreadable embedding shard ({exc})")) from None
            self._indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        return self._indexes[shard]


def _plain_sharding(array) -> tuple[int, int] | None:
    """(shard rows, inner chunk rows) when `array` is sharded with uncompressed little-endian inner
    chunks holding whole rows and its index (with CRC32C) at the end; else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner_ok = len(sharding.codecs) == 1 and isinstance(sharding.codecs[0], BytesCodec) and _little(sharding.codecs[0])
    index_ok = (len(sharding.index_codecs) == 2 and isinstance(sharding.index_codecs[0], BytesCodec)
                and _little(sharding.index_codecs[0]) and isinstance(sharding.index_codecs[1], Crc32cCodec))
    whole_rows = sharding.chunk_shape[1] == array.shape[1] and array.shards[1] == array.shape[1]
    if not (inner_ok and index_ok and whole_rows and sharding.index_location == ShardingCodecIndexLocation.end):
        return None
    return int(array.shards[0]), int(sharding.chunk_shape[0])


def _little(codec) -> bool:
    return codec.endian is None or codec.endian.value == "little"
