"""Re-rank reads: `RowReader` (positioned reads, 8 in flight) against a memory map of the same
shard files (what it did before), cold and warm, on a float16 store of synthetic 768-d vectors.

    .venv/bin/python benchmarks/bench_rows.py                          # writes a 2 M-row store (3 GB) to a temporary folder
    .venv/bin/python benchmarks/bench_rows.py --store /tmp/scale10m/run2/store.zarr   # an existing one (bench_scale --keep)

Two access patterns: a re-rank's (30,000 random rows: 1,000 queries x a shortlist of 30) and an
index build's (65,536 consecutive rows). "cold": the store's files evicted from the page cache
first (`posix_fadvise(DONTNEED)` after a sync), as for an archive larger than RAM; "warm": the same
rows read a second time. Both readers get the same rows; the results are checked equal.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import evict, write_store  # noqa: E402
from machine import machine_line  # noqa: E402

from rsretrieve.store.rows import RowReader  # noqa: E402


class MappedRows(RowReader):
    """The baseline: the same rows at the same offsets, gathered from memory-mapped shard files."""

    def _read_plain(self, rows: np.ndarray) -> np.ndarray:
        row_bytes = self.dim * self.array.dtype.itemsize
        out = np.full((rows.size, self.dim), np.nan, np.float32)
        for path, at, offsets in self._locations(rows):
            mapped = np.memmap(path, dtype=self.array.dtype, mode="r", shape=(path.stat().st_size // row_bytes, self.dim))
            out[at] = mapped[offsets // row_bytes]
        return out


def timed(reader: RowReader, rows: np.ndarray) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = reader.read(rows)
    return out, rows.size / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="an existing store (its s2 group); default: write one of --n rows")
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each draws new rows")
    args = parser.parse_args()
    scratch = None
    if args.store is None:
        scratch = Path(tempfile.mkdtemp(prefix="rsretrieve-bench-rows-"))
        store_path = scratch / "store.zarr"
        write_store(store_path, args.n, 768)
    else:
        store_path = Path(args.store)
    try:
        group = store_path / "s2"
        n = RowReader(group).n_rows
        rng = np.random.default_rng(0)
        patterns = {"re-rank: 30,000 random rows": lambda: rng.choice(n, 30_000, replace=False),
                    "build: 65,536 consecutive rows": lambda: np.arange(start := int(rng.integers(0, n - 65_536)), start + 65_536)}
        results: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(args.repeats):
            for pattern, draw in patterns.items():
                for name, cls in (("memory map (before)", MappedRows), ("RowReader", RowReader)):
                    rows = draw()
                    evict(group)
                    reader = cls(group)
                    cold, cold_rate = timed(reader, rows)
                    warm, warm_rate = timed(reader, rows)
                    assert np.array_equal(cold, warm, equal_nan=True)
                    results.setdefault((pattern, "cold", name), []).append(cold_rate)
                    results.setdefault((pattern, "warm", name), []).append(warm_rate)
        check = rng.choice(n, 2_000, replace=False)
        assert np.array_equal(MappedRows(group).read(check), RowReader(group).read(check), equal_nan=True)
        print(f"\n{machine_line()}")
        print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
        print(f"store: {store_path} ({n:,} rows x 768 float16); median of {args.repeats} rounds, rows/s")
        print("-" * 96)
        print(f"{'pattern':<32} {'cache':<6} {'memory map (before)':>20} {'RowReader':>12} {'ratio':>8}")
        for pattern in patterns:
            for cache in ("cold", "warm"):
                before = float(np.median(results[(pattern, cache, "memory map (before)")]))
                now = float(np.median(results[(pattern, cache, "RowReader")]))
                print(f"{pattern:<32} {cache:<6} {before:>20,.0f} {now:>12,.0f} {now / before:>7.1f}x")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
