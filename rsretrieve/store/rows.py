"""Random access to a store group's embedding rows, for re-ranking an approximate index's shortlist.

    reader = RowReader(store.path / "s2")
    vectors = reader.read(np.array([17, 3, 17, 9_000_000]))   # (4, dim) float32, in the order asked

Rows may come in any order and repeat; each distinct row is read once. A store written by
rsretrieve keeps `embedding` in uncompressed Zarr v3 shards (`store.layout`): a row is then one
read of `dim * itemsize` bytes at the offset the shard's index gives (the index, 16 bytes per inner
chunk at the end of the file, is read once per shard). Any other layout (compressed, unsharded,
older stores) is read through zarr.

The reads are positioned reads (`os.preadv`) straight into the result, several at once, and rows
that lie back to back are one read. Not a memory map: a page fault on a mapped file reads around
the page (the device's read-ahead, 8 MiB on the machine measured), so each 1.5 KB row of a store
that is not in the page cache cost a megabytes-long read; threads keep several reads in flight,
which a virtual disk answers ~3x faster than one at a time (BENCHMARKS.md, "Re-rank reads").
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import zarr

from rsretrieve.errors import StoreError, located
from rsretrieve.store.checksum import ChecksumError, row_checksums
from rsretrieve.store.layout import ROW_CHECKSUM

EMPTY = np.uint64(2**64 - 1)  # the sharding index's mark of an inner chunk never written
READ_THREADS = 8  # reads in flight: past ~8 a virtual disk answers no faster
READS_PER_TASK = 64  # positioned reads one thread makes in a row (one file open each)
RUN_BYTES = 8 << 20  # back-to-back rows are read together up to this size


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
        self._checksums = _row_checksums(self.path)  # None for stores made before rows had their own
        self._shard_checksums: dict[int, np.ndarray] = {}

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
        """Rows (sorted, distinct) read from the shard files by byte offset: each shard's rows as
        runs of back-to-back rows, the runs spread over a few threads."""
        row_bytes = self.dim * self.array.dtype.itemsize
        raw = np.empty((rows.size, row_bytes), np.uint8)  # rows never written are NaN below
        written = np.zeros(rows.size, bool)
        tasks = []
        for path, at, offsets in self._locations(rows):
            written[at] = True
            runs = _runs(at, offsets, row_bytes)
            tasks += [(str(path), runs[i:i + READS_PER_TASK]) for i in range(0, len(runs), READS_PER_TASK)]
        if len(tasks) > 1:
            list(_pool(os.getpid()).map(lambda task: _read_runs(*task, raw, row_bytes), tasks))
        elif tasks:
            _read_runs(*tasks[0], raw, row_bytes)
        if self._checksums is not None:
            self._check(rows[written], raw[written])
        out = raw.view(self.array.dtype).reshape(rows.size, self.dim).astype(np.float32)
        out[~written] = np.nan
        return out

    def _check(self, rows: np.ndarray, raw: np.ndarray) -> None:
        """Each row read against its stored CRC32C (a damaged row is an error, never a score)."""
        shard_rows = self._plain[0]
        expected = np.empty(rows.size, np.uint32)
        shards = rows // shard_rows
        for shard in np.unique(shards).tolist():
            if shard not in self._shard_checksums:  # one inner chunk of the checksum array per shard, checked by zarr
                self._shard_checksums[shard] = np.asarray(self._checksums[shard * shard_rows:(shard + 1) * shard_rows])
            at = shards == shard
            expected[at] = self._shard_checksums[shard][rows[at] - shard * shard_rows]
        bad = np.flatnonzero(row_checksums(raw) != expected)
        if bad.size:
            row = int(rows[bad[0]])
            raise ChecksumError(located(self._shard_file(row // shard_rows), f"embedding row {row} fails its checksum (damaged on disk"
                                        f"{f', and {bad.size - 1} more' if bad.size > 1 else ''}); run `rsretrieve verify`, then "
                                        "`rsretrieve encode` to repair it"))

    def _locations(self, rows: np.ndarray):
        """(shard file, positions in `rows`, byte offsets) of the rows (sorted, distinct) that were
        written, shard by shard."""
        shard_rows, inner_rows = self._plain
        row_bytes = self.dim * self.array.dtype.itemsize
        shards = rows // shard_rows
        for at in np.split(np.arange(rows.size), np.flatnonzero(np.diff(shards)) + 1):
            shard = int(shards[at[0]])
            index = self._shard_index(shard)
            if index is None:
                continue
            local = rows[at] - shard * shard_rows
            chunk_offsets = index[local // inner_rows, 0]
            ok = chunk_offsets != EMPTY
            # inner chunks hold whole rows back to back: a row lies at its chunk's offset plus its place
            yield self._shard_file(shard), at[ok], chunk_offsets[ok].astype(np.int64) + (local[ok] % inner_rows) * row_bytes

    def shard_problem(self, shard: int) -> str | None:
        """Why a shard file of an rsretrieve layout cannot serve its rows, from its index alone (a
        few KB at its end): the index cut or failing its checksum, or an inner chunk it lists past
        the file's end. None for an intact shard, a shard never written, or another layout (read
        through zarr: `verify` reads it whole)."""
        if not self._plain:
            return None
        try:
            index = self._shard_index(shard)
        except StoreError as exc:
            return str(exc)
        if index is None:
            return None
        written = index[:, 0] != EMPTY
        end = int((index[written, 0] + index[written, 1]).max()) if written.any() else 0
        path = self._shard_file(shard)
        if end > path.stat().st_size - self._index_bytes():
            return located(path, f"embedding shard is damaged: its index lists data up to byte {end:,}, past the data it holds (truncated?)")
        return None

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
                    f.seek(max(0, os.fstat(f.fileno()).st_size - size))
                    raw = f.read(size)
            except FileNotFoundError:
                self._indexes[shard] = None
                return None
            except OSError as exc:
                raise StoreError(located(path, f"unreadable embedding shard ({exc.strerror})")) from None
            if len(raw) != size or _crc32c(raw[:-4]) != raw[-4:]:  # the index the spec ends a shard with, checked
                raise StoreError(located(path, "embedding shard is damaged: its index fails its checksum (truncated?)"))
            self._indexes[shard] = np.frombuffer(raw[:-4], dtype="<u8").reshape(n_inner, 2)
        return self._indexes[shard]


def _row_checksums(group_path: Path):
    try:
        return zarr.open_array(group_path / ROW_CHECKSUM, mode="r", zarr_format=3)
    except Exception:  # noqa: BLE001 — absent (an older store): rows are read unchecked, as they were written
        return None


def _runs(dest: np.ndarray, offsets: np.ndarray, row_bytes: int) -> list[tuple[int, int, int]]:
    """(first result row, rows, byte offset) of each run of rows that sit back to back in the file
    and in the result, at most RUN_BYTES each."""
    if not dest.size:
        return []
    breaks = (np.diff(offsets) != row_bytes) | (np.diff(dest) != 1)
    starts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
    lengths = np.diff(np.concatenate([starts, [dest.size]]))
    most = max(1, RUN_BYTES // row_bytes)
    out = []
    for start, length in zip(starts.tolist(), lengths.tolist()):
        for s in range(start, start + length, most):
            out.append((int(dest[s]), min(most, start + length - s), int(offsets[s])))
    return out


def _read_runs(path: str, runs: list[tuple[int, int, int]], raw: np.ndarray, row_bytes: int) -> None:
    """Positioned reads of `runs` from `path` into `raw`'s rows; a short read (a truncated shard) is
    a StoreError naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise StoreError(located(path, f"unreadable embedding shard ({exc.strerror})")) from None
    try:
        for first, count, offset in runs:
            if os.preadv(fd, [raw[first:first + count]], offset) != count * row_bytes:
                raise StoreError(located(path, "embedding shard is shorter than its index says (truncated?)"))
    except OSError as exc:  # an I/O error, or an offset the file system refuses
        raise StoreError(located(path, f"unreadable embedding shard ({exc.strerror})")) from None
    finally:
        os.close(fd)


def _crc32c(data: bytes) -> bytes:
    import google_crc32c

    return int(google_crc32c.value(data)).to_bytes(4, "little")


@lru_cache(maxsize=1)
def _pool(pid: int) -> ThreadPoolExecutor:
    """The reading threads of this process (keyed by pid: a forked child needs threads of its own)."""
    return ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rsretrieve-rows")


def _plain_sharding(array) -> tuple[int, int] | None:
    """(shard rows, inner chunk rows) when `array` is sharded with uncompressed little-endian inner
    chunks (a CRC32C at their end or not) holding whole rows, and its index (with CRC32C) at the
    end; else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation

    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    # a CRC32C after the bytes (`store.checksum`) leaves every row where it was
    inner_ok = (isinstance(sharding.codecs[0], BytesCodec) and _little(sharding.codecs[0])
                and all(isinstance(codec, Crc32cCodec) for codec in sharding.codecs[1:]) and len(sharding.codecs) <= 2)
    index_ok = (len(sharding.index_codecs) == 2 and isinstance(sharding.index_codecs[0], BytesCodec)
                and _little(sharding.index_codecs[0]) and isinstance(sharding.index_codecs[1], Crc32cCodec))
    whole_rows = sharding.chunk_shape[1] == array.shape[1] and array.shards[1] == array.shape[1]
    if not (inner_ok and index_ok and whole_rows and sharding.index_location == ShardingCodecIndexLocation.end):
        return None
    return int(array.shards[0]), int(sharding.chunk_shape[0])


def _little(codec) -> bool:
    return codec.endian is None or codec.endian.value == "little"
