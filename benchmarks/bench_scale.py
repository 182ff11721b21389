"""Scale benchmark of the ``ivfpq-disk`` index: a float16 store of N synthetic 768-d vectors, the
index built on a Dask LocalCluster, queries re-ranked from the store, recall against exact search.

    .venv/bin/python benchmarks/bench_scale.py                    # 200k vectors, ~4 min on 2 cores (OPQ: 2.5)
    .venv/bin/python benchmarks/bench_scale.py --n 10000000       # the real run (~30-45 min unloaded, ~17 GB of disk)

1. The store: `clustered` vectors (bench_search.py: a Gaussian mixture in a 32-dim subspace, like
   [CLS] embeddings) drawn block by block (never all in memory), written through the store's own
   API (`EmbeddingStore.create`, then `write_chunk` per block) as float16.
2. The index: `rsretrieve.indexer.index_build.build_index` on a LocalCluster of `--workers`
   single-threaded worker processes (train on a sample here, one part per slice of rows on the
   workers, merged here; tuned on proxy queries), saved, loaded again (memory-mapped).
3. Search: 1,000 queries from the same mixture (not in the archive) in batches of `--batch`,
   re-ranked exactly with vectors read from the store. Recall@10 against exact search, computed by
   streaming every store row through a matrix product (no index involved).

Reported: peak RSS (VmHWM) of this process and of every worker process, and the peak of their sum
(sampled every 0.25 s), bytes per vector in RAM (the index's own arrays: PQ codes, ids, centroids)
and on disk (store, index), build time (train, add, merge, tune), load time, queries/s, recall@10,
files in the store. Queries/s are measured twice: cold, with the store's and the index's files
evicted from the page cache first (an archive of 10^8 rows never fits in it), then warm.

    .venv/bin/python benchmarks/bench_scale.py --n 10000000 --dir /data/run --keep
    .venv/bin/python benchmarks/bench_scale.py --n 10000000 --dir /data/run --search-only   # search again
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import clustered  # noqa: E402
from machine import machine_line  # noqa: E402

from rsretrieve.retrieval import EmbeddingIndex, recall_at_k  # noqa: E402
from rsretrieve.store import EmbeddingStore  # noqa: E402
from rsretrieve.store.zarr_store import ChunkSpan  # noqa: E402

PROVENANCE = {"model": "synthetic", "config": {"embed_dim": 768}, "checkpoint_sha256": "synthetic-mixture", "preprocessing": {},
              "dataset": {"name": "synthetic"}}
QUERY_SEED = 10**9  # the queries' points: the same mixture, another draw


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the most resident memory the process has had (kernel-tracked, no sampling needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TotalRss:
    """The peak of this process's RSS plus its children's, sampled in a thread (VmHWM is per process:
    their peaks need not coincide, their sum is what the machine must hold)."""

    def __init__(self, every_s: float = 0.25):
        import psutil

        self.me, self.every_s, self.peak_mb = psutil.Process(), every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def now_mb(self) -> float:
        import psutil

        total = 0
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a process that just ended
                pass
        return total / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, self.now_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def evict(*folders: Path) -> None:
    """Drop the folders' files from the page cache (written back first), as after a reboot."""
    os.sync()
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def span_rows(n: int, dim: int) -> int:
    """Rows written per `write_chunk`: one embedding shard of the store when it is sharded."""
    try:
        from rsretrieve.store.layout import embedding_grid

        return int(embedding_grid(n, dim, 2)[1])
    except ImportError:
        return 65_536


def write_store(path: Path, n: int, dim: int) -> tuple[EmbeddingStore, float]:
    t0 = time.perf_counter()
    step = span_rows(n, dim)
    spans = [ChunkSpan(f"block{i:06d}", start, min(start + step, n)) for i, start in enumerate(range(0, n, step))]
    ids = np.char.mod("p%09d", np.arange(n))
    meta = pa.table({"patch_id": pa.array(ids.tolist()), "lat": np.zeros(n), "lon": np.zeros(n)})
    store = EmbeddingStore(path)
    store.create("s2", meta, spans, dim, PROVENANCE, dtype="float16")
    del meta
    for i, span in enumerate(spans):
        block = clustered(span.stop - span.start, dim=dim, seed=0, points_seed=i)
        store.write_chunk("s2", span, ids[span.start:span.stop].tolist(), block.astype(np.float16))
        if i % 50 == 0:
            print(f"  store: {span.stop:,} / {n:,} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
    return store, time.perf_counter() - t0


def exact_top10(store: EmbeddingStore, queries: np.ndarray, k: int = 10, batch: int = 16_384) -> tuple[np.ndarray, float]:
    """Exact top-k rows of each (normalised) query by streaming the whole store group."""
    from rsretrieve.store.read import iter_embeddings

    t0 = time.perf_counter()
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.full((len(queries), k), -1, np.int64)
    for rows, vectors in iter_embeddings(store.open("s2", index=False), None, batch):
        sims = queries @ vectors.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        scores = np.concatenate([best_s, np.take_along_axis(sims, part, axis=1)], axis=1)
        cand = np.concatenate([best_r, rows[part]], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_s, best_r = np.take_along_axis(scores, order, axis=1), np.take_along_axis(cand, order, axis=1)
    return best_r, time.perf_counter() - t0


def search_all(index, queries: np.ndarray, k: int, batch: int) -> tuple[np.ndarray, float, float]:
    """(rows, queries/s with re-ranking, queries/s of the PQ shortlist alone)."""
    index.search(queries[:8], k)  # warm up
    t0 = time.perf_counter()
    rows = np.concatenate([index.search(queries[s:s + batch], k)[1] for s in range(0, len(queries), batch)])
    total = time.perf_counter() - t0
    shortlist = int(round(k * index.params["k_factor"]))
    t0 = time.perf_counter()
    for s in range(0, len(queries), batch):
        index.cpu_index.search(queries[s:s + batch], shortlist)
    pq_only = time.perf_counter() - t0
    return rows, len(queries) / total, len(queries) / pq_only


def folder_bytes(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def worker_peaks(client) -> dict[str, float]:
    """VmHWM of every worker process, and of their parent processes other than this one."""
    pids = client.run(os.getpid)
    peaks = {f"worker pid {pids[addr]}": mb for addr, mb in client.run(peak_rss_mb).items()}
    for parent in set(client.run(os.getppid).values()) - {os.getpid()}:
        try:
            peaks[f"worker parent pid {parent}"] = peak_rss_mb(parent)
        except OSError:
            pass
    return peaks


def phase(name: str, t0: float) -> None:
    print(f"  {name}: {time.perf_counter() - t0:,.1f} s, peak RSS so far {peak_rss_mb():,.0f} MB", flush=True)


def run(args) -> list[tuple[str, str]]:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rsretrieve-bench-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    rss = TotalRss()
    try:
        print(f"[{args.n:,} x {args.dim}] in {root}", flush=True)
        out = [("vectors", f"{args.n:,} x {args.dim} float16")]
        if args.search_only:
            store = EmbeddingStore(root / "store.zarr")
            out.append(("store, build", f"from an earlier run in {root}"))
        else:
            store, built = write_and_build(root, args)
            out += built
        out += search(root, store, args)
        out.append(("peak RSS", f"all processes together {rss.stop():,.0f} MB (sampled); this process {peak_rss_mb():,.0f} MB"
                                + "".join(f", {k} {v:,.0f} MB" for k, v in sorted(getattr(args, "worker_peaks", {}).items()))))
    finally:
        rss.stop()
        if not args.keep and not args.search_only:
            shutil.rmtree(root, ignore_errors=True)
    return out


def write_and_build(root: Path, args) -> tuple[EmbeddingStore, list[tuple[str, str]]]:
    """The store written and the index built on a LocalCluster, saved to `root`/index/s2."""
    from distributed import Client, LocalCluster

    from rsretrieve.indexer.index_build import build_index

    store, write_s = write_store(root / "store.zarr", args.n, args.dim)
    store_bytes, store_files = folder_bytes(store.path)
    print(f"  store written in {write_s:.0f} s: {store_bytes / 2**30:.2f} GiB in {store_files} files; peak RSS {peak_rss_mb():,.0f} MB",
          flush=True)
    overrides = {k: v for k, v in (("nlist", args.nlist), ("m", args.m), ("slice_rows", args.slice_rows)) if v}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        index = build_index(client, store.path, "s2", work_dir=root, target_recall=args.target_recall, **overrides)
        build_s = time.perf_counter() - t0
        phase("built", t0)
        args.worker_peaks = worker_peaks(client)
    index.save(root / "index" / "s2", store_id=store.store_id)
    p = index.params
    steps = p.get("build_s", {})
    tune_s = build_s - sum(steps.values())
    return store, [
        ("store write", f"{write_s:,.0f} s ({args.n / write_s:,.0f} vectors/s)"),
        ("build", f"{build_s:,.0f} s: train {steps.get('train', 0):,.0f} s (sample {p['train_size']:,}), "
                  f"add {steps.get('add', 0):,.0f} s ({args.workers} workers), merge {steps.get('merge', 0):,.0f} s, tune {tune_s:,.0f} s"),
        ("files in the store", f"{store_files:,}"),
    ]


def search(root: Path, store: EmbeddingStore, args) -> list[tuple[str, str]]:
    """The saved index loaded (memory-mapped) and searched cold, then warm; recall against exact search."""
    evict(store.path, root / "index")
    t0 = time.perf_counter()
    index = EmbeddingIndex.load(root / "index" / "s2", store_path=store.path, use_gpu=False)
    load_s = time.perf_counter() - t0
    queries = clustered(args.queries, dim=args.dim, seed=0, points_seed=QUERY_SEED)
    found, cold_qps, _ = search_all(index, queries, 10, args.batch)
    _, warm_qps, pq_qps = search_all(index, queries, 10, args.batch)
    phase("searched", t0)
    truth, exact_s = exact_top10(store, queries)
    phase("exact search", t0)
    store_bytes, _ = folder_bytes(store.path)
    index_bytes, _ = folder_bytes(root / "index")
    p = index.params
    return [
        ("index", f"ivfpq-disk nlist {p['nlist']} ({p['quantizer']} quantizer), {'OPQ+' if p.get('opq') else ''}PQ{p['m']}x{p['nbits']}, "
                  f"nprobe {p['nprobe']}, k_factor {p['k_factor']:g} (tuned recall {p.get('tuned_recall')})"),
        ("load", f"{load_s * 1000:,.0f} ms (memory-mapped, cold)"),
        ("queries/s", f"{cold_qps:,.0f} cold, {warm_qps:,.0f} warm: re-ranked from the store, batches of {args.batch} "
                      f"({pq_qps:,.0f}/s PQ shortlist alone)"),
        ("recall@10", f"{recall_at_k(found, truth):.4f} vs exact search ({args.queries:,} queries; exact streaming took {exact_s:,.0f} s)"),
        ("bytes/vector in RAM", f"{p['bytes_per_vector']:,.1f} (PQ codes + ids + centroids)"),
        ("bytes/vector on disk", f"store {store_bytes / args.n:,.0f}, index {index_bytes / args.n:,.1f}"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000, help="vectors in the archive (the real run: 10000000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256, help="queries per search call")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    parser.add_argument("--target-recall", type=float, default=0.95, help="what the build tunes nprobe / k_factor for")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--m", type=int, default=None, help="PQ sub-quantisers")
    parser.add_argument("--slice-rows", type=int, default=None, help="rows per part (one Dask task each)")
    parser.add_argument("--dir", default=None, help="where the store and index go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store and index")
    parser.add_argument("--search-only", action="store_true", help="search the store and index an earlier --keep run left in --dir")
    args = parser.parse_args()
    rows = run(args)
    print("\n" + machine_line())
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    width = max(len(name) for name, _ in rows)
    print("-" * 100)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
