#!/usr/bin/env python
"""Planning and ledger-check times at scale, the figures the tests once asserted on the wall clock
(tests/test_majortom_plan.py and tests/test_store_shards.py now check what runs, not how long):

- Major TOM: `chunks("s2")` of a synthetic collection whose metadata.parquet lists `--tiles` tiles
  (1,000 per shard; the shards are placeholders that planning never opens);
- the store's ledger checks, `damaged_chunks` and `chunks_with_skips`, over `--chunks` chunks of
  5 rows each.

    .venv/bin/python benchmarks/bench_planning.py [--tiles 1000000] [--chunks 200000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
from machine import machine_line  # noqa: E402
from test_majortom_plan import synthetic_collection  # noqa: E402  (the tests' generator, one definition)

from rsretrieve.datasets import open_dataset  # noqa: E402
from rsretrieve.store import ChunkSpan, EmbeddingStore  # noqa: E402
from rsretrieve.store.integrity import chunks_with_skips, damaged_chunks  # noqa: E402


def plan_seconds(folder: Path, tiles: int) -> tuple[float, int]:
    ds = open_dataset("majortom", synthetic_collection(folder, tiles, 1000))
    started = time.perf_counter()
    chunks = ds.chunks("s2")
    return time.perf_counter() - started, len(chunks)


def ledger_seconds(folder: Path, n_chunks: int) -> float:
    spans = [ChunkSpan(f"c{i}", i * 5, i * 5 + 5) for i in range(n_chunks)]
    store = EmbeddingStore(folder / "big.zarr")
    store.create("s2", pa.table({"patch_id": [f"p{i}" for i in range(n_chunks * 5)]}), spans, 4,
                 {"model": "test", "checkpoint_sha256": "random-init"}, "float16")
    group = store.zarr_group("s2", "r+")
    group["chunk_done"][:] = True
    group["chunk_valid"][:] = 5
    group["embedding"][:] = np.zeros((n_chunks * 5, 4), np.float16)
    group["valid"][:] = True
    started = time.perf_counter()
    damaged_chunks(store, "s2")
    chunks_with_skips(store, "s2")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--chunks", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan, n = plan_seconds(Path(tmp) / "majortom", args.tiles)
        ledger = ledger_seconds(Path(tmp), args.chunks)
    print(f"\n{machine_line()}")
    print("| what | size | seconds |\n|---|---:|---:|")
    print(f"| Major TOM plan, chunks('s2') | {args.tiles:,} tiles -> {n:,} chunks | {plan:.2f} |")
    print(f"| ledger checks (damaged_chunks + chunks_with_skips) | {args.chunks:,} chunks | {ledger:.2f} |")


if __name__ == "__main__":
    main()
