"""Every chunk of every store array carries a CRC32C (Zarr v3's `crc32c` codec, inside shards too),
and a read that fails it is an error, never data.

Zarr checks the codec on every decode; this module makes that failure rsretrieve's own
(`ChecksumError`, a one-line store error), and finds *which* chunks of an array are damaged
(`scan`): chunks that fail their checksum, are cut short, or are gone although the store wrote
them. Every chunk is written, even one that holds only the fill value (`write_empty_chunks`), so a
missing file of a coordinate or ledger array is always damage. (`embedding` and `valid` files appear
shard by shard as encoding goes on: the ledger, not the listing, says which must exist:
`integrity.damaged_chunks`.)

    damage = scan(group["labels"], group_dir / "labels")   # [Damage(rows=(0, 16384), why=...)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from rsretrieve.errors import StoreError

DAMAGED = "fail their checksum (damaged on disk)"


class ChecksumError(StoreError, ValueError):
    """A stored chunk whose bytes do not match their CRC32C. (A ValueError too: what zarr raised.)"""


class VerifiedCrc32c(Crc32cCodec):
    """Zarr's `crc32c` codec (same name, same bytes on disk), failing with a `ChecksumError`."""

    def _decode_sync(self, chunk_bytes, chunk_spec):
        try:
            return super()._decode_sync(chunk_bytes, chunk_spec)
        except ValueError:
            raise ChecksumError("a stored chunk fails its checksum (damaged on disk): run `rsretrieve verify` to name it, "
                                "`rsretrieve encode` to repair it") from None


def install() -> None:
    """Use `VerifiedCrc32c` for `crc32c`, and write every chunk (even all-fill ones) in this process."""
    zarr.registry.register_codec("crc32c", VerifiedCrc32c)
    zarr.config.set({"codecs.crc32c": f"{VerifiedCrc32c.__module__}.{VerifiedCrc32c.__qualname__}",
                     "array.write_empty_chunks": True})


def checksummed(array) -> bool:
    """Whether an array's chunks carry a CRC32C (stores written before this rsretrieve do not)."""
    codecs = list(array.metadata.codecs)
    inner = getattr(codecs[0], "codecs", ()) if codecs else ()
    return any(isinstance(codec, Crc32cCodec) for codec in (*codecs, *inner))


@dataclass(frozen=True)
class Damage:
    """Rows [start, stop) of an array that cannot be served, and why."""

    rows: tuple[int, int]
    why: str

    def __str__(self) -> str:
        first, last = self.rows[0], self.rows[1] - 1
        if first != last:
            return f"rows {first}-{last} {self.why}"
        return f"row {first} {self.why.replace('are ', 'is ', 1).replace('fail their', 'fails its', 1)}"


def scan(array, array_dir: Path, expect_files: bool = True, first_rows: int | None = None,
         wrong_rows: Callable[[int, np.ndarray], np.ndarray] | None = None) -> list[Damage]:
    """The damaged parts of an array: each file read whole (a shard, or an unsharded chunk), and
    only a file that fails read again inner chunk by inner chunk, to name the rows. With
    `expect_files`, a file the array's shape calls for and the disk lacks is damage too.
    `first_rows`: only the rows before it (a ledger's length is its keys'). `wrong_rows(start,
    values)`: the rows of a readable file that break an invariant (e.g. valid, not finite)."""
    n = int(array.shape[0]) if first_rows is None else min(int(array.shape[0]), first_rows)
    per_file, per_chunk = int((array.shards or array.chunks)[0]), int(array.chunks[0])
    present = _files(array_dir) if expect_files else None
    found: list[Damage] = []
    for start in range(0, n, per_file):
        stop = min(start + per_file, n)
        key = array.metadata.chunk_key_encoding.encode_chunk_key((start // per_file,) + (0,) * (array.ndim - 1))
        if present is not None and key not in present:
            found.append(Damage((start, stop), f"are lost (file {key} is missing)"))
            continue
        values, why = _read(array, start, stop)
        if why:
            found += [Damage((a, min(a + per_chunk, stop)), why) for a in range(start, stop, per_chunk)
                      if (why := _read(array, a, min(a + per_chunk, stop))[1])]
        elif wrong_rows is not None:
            found += [Damage((int(row), int(row) + 1), "are marked valid but not finite") for row in wrong_rows(start, values)]
    return found


def _read(array, start: int, stop: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return np.asarray(array[start:stop]), None
    except ChecksumError:
        return None, DAMAGED
    except Exception as exc:  # noqa: BLE001 — a cut shard index, a zstd frame that does not decode
        return None, f"are unreadable ({' '.join(f'{type(exc).__name__}: {exc}'.split())[:120]})"


def _files(array_dir: Path) -> set[str]:
    return {p.relative_to(array_dir).as_posix() for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"}


def row_checksums(rows: np.ndarray) -> np.ndarray:
    """The CRC32C of each row's bytes as Zarr stores them (little-endian), as uint32."""
    import google_crc32c

    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).view(np.uint8).reshape(len(rows), -1)
    return np.fromiter((google_crc32c.value(row) for row in data), np.uint32, len(rows))


def read_readable(array, start: int, stop: int, fill) -> np.ndarray:
    """`array[start:stop]`, the rows of chunks that fail their checksum set to `fill` (rows about to
    be written again: `store.repair`)."""
    try:
        return np.array(array[start:stop])
    except ChecksumError:
        pass
    out = np.full((stop - start, *array.shape[1:]), fill, dtype=array.dtype)
    step = int(array.chunks[0])
    for first in range(start - start % step, stop, step):
        lo, hi = max(first, start), min(first + step, stop)
        try:
            out[lo - start:hi - start] = array[lo:hi]
        except ChecksumError:
            continue
    return out
