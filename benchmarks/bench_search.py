"""Search throughput, memory per vector and recall@10 of the index kinds vs a numpy baseline.

    .venv/bin/python benchmarks/bench_search.py               # 100k and 1M vectors (~10 min, 2 cores)
    .venv/bin/python benchmarks/bench_search.py --quick       # 100k only

Synthetic clustered embeddings (a mixture of Gaussians in a 32-dim subspace of R^768 under a random
rotation, plus small isotropic noise, like real [CLS] embeddings), L2-normalised. Queries are drawn
from the same mixture and are not in the archive. Recall@10 is measured against exact search
(faiss flat, itself checked against numpy). The numpy baseline is a float32 matrix product with
argpartition + sort of the top k, measured in the same run on the same machine.
Memory per vector counts the index's own arrays (codes, ids, graph links, refine vectors).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from rsretrieve.retrieval.faiss_index import EmbeddingIndex, recall_at_k


def clustered(n, dim=768, sub=32, clusters=256, seed=0, noise=0.02, batch=100_000, points_seed=None):
    """`seed` fixes the mixture; `points_seed` (default: the same stream) the points drawn from it,
    so that blocks of one mixture can be drawn one at a time (benchmarks/bench_scale.py)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, sub)))
    basis = basis.astype(np.float32)
    centres = rng.standard_normal((clusters, sub)).astype(np.float32)
    if points_seed is not None:
        rng = np.random.default_rng([seed, points_seed])
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        low = centres[rng.integers(0, clusters, m)] + 0.35 * rng.standard_normal((m, sub), dtype=np.float32)
        block = low @ basis.T + noise * rng.standard_normal((m, dim), dtype=np.float32) + 0.5 * basis[:, 0]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out


def numpy_search(archive, queries, k, batch=256):
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        sims = queries[s:s + batch] @ archive.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s:s + batch] = np.take_along_axis(part, order, axis=1)
    return out


def index_bytes(index: EmbeddingIndex) -> int:
    import faiss

    idx = index.cpu_index
    if index.kind == "flat":
        return idx.ntotal * idx.code_size
    if index.kind == "hnsw":
        storage = faiss.downcast_index(idx.storage)
        h = idx.hnsw
        return storage.ntotal * storage.code_size + h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
    base = faiss.downcast_index(idx.base_index) if hasattr(idx, "base_index") else idx
    total = base.ntotal * (base.code_size + 8)  # PQ codes + 64-bit ids in the inverted lists
    if hasattr(idx, "refine_index"):
        refine = faiss.downcast_index(idx.refine_index)
        total += refine.ntotal * refine.code_size
    return total


def timed_search(fn, queries, k, min_seconds=1.0):
    fn(queries[:8], k)  # warm up
    reps, start = 0, time.perf_counter()
    while True:
        result = fn(queries, k)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return result, reps * len(queries) / elapsed


def run(n, n_queries, numpy_queries, kinds, k=10, seed=0):
    t0 = time.perf_counter()
    data = clustered(n + n_queries, seed=seed)
    archive, queries = data[:n], np.ascontiguousarray(data[n:])
    del data
    print(f"\n[{n:,} x {archive.shape[1]}] data generated in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    nq = queries[:numpy_queries]
    start = time.perf_counter()
    np_ids = numpy_search(archive, nq, k)
    np_qps = len(nq) / (time.perf_counter() - start)
    rows.append(("numpy matmul+argpartition", 0.0, np_qps, archive.shape[1] * 4, 1.0, f"{len(nq)} queries"))
    truth = None
    for kind in kinds:
        start = time.perf_counter()
        index = EmbeddingIndex.from_vectors(archive, kind=kind, use_gpu=False)
        build = time.perf_counter() - start
        (_, found), qps = timed_search(index.search, queries, k)
        if kind == "flat":
            truth = found
            agree = recall_at_k(found[: len(nq)], np_ids)
            print(f"  flat vs numpy top-{k} agreement: {agree:.4f}", flush=True)
        recall = recall_at_k(found, truth) if truth is not None else float("nan")
        params = {key: v for key, v in index.params.items() if key in ("nlist", "m", "nprobe", "k_factor", "hnsw_m", "ef_search")}
        rows.append((f"{kind} {params}" if params else kind, build, qps, index_bytes(index) / index.ntotal, recall, ""))
        print(f"  {kind}: build {build:.1f} s, {qps:,.0f} q/s, recall@{k} {recall:.4f}", flush=True)
        del index
    return rows, np_qps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--quick", action="store_true", help="100k vectors only")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", default="flat,ivfpq,hnsw")
    parser.add_argument("--hnsw-max", type=int, default=300_000,
                        help="skip HNSW above this archive size (its build is the slowest step on 2 cores)")
    args = parser.parse_args()
    sizes = [100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    import faiss

    print(f"faiss {faiss.__version__}, {os.cpu_count()} CPUs, omp threads {faiss.omp_get_max_threads()}")
    table = []
    for n in sizes:
        kinds = [k for k in args.kinds.split(",") if not (k == "hnsw" and n > args.hnsw_max)]
        numpy_queries = args.queries if n <= 200_000 else max(100, args.queries // 5)
        rows, np_qps = run(n, args.queries, numpy_queries, kinds)
        table.extend((n, *row, row[2] / np_qps) for row in rows)
    header = f"{'N':>9}  {'method':<58} {'build s':>8} {'queries/s':>10} {'x numpy':>8} {'bytes/vec':>9} {'recall@10':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for n, method, build, qps, nbytes, recall, note, ratio in table:
        print(f"{n:>9,}  {method:<58} {build:>8.1f} {qps:>10,.0f} {ratio:>8.2f} {nbytes:>9,.0f} {recall:>9.4f} {note}")


if __name__ == "__main__":
    main()
