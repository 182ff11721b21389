"""IVF-PQ construction for `EmbeddingIndex` (kind ``ivfpq``): default parameters from the archive
size and dimension, and training on a sample read from the store slab by slab."""

from __future__ import annotations

import math

import numpy as np

from rsretrieve.errors import StoreError
from rsretrieve.store.read import iter_embeddings


def _faiss():
    import faiss

    return faiss


def default_nlist(n: int) -> int:
    """~4*sqrt(N), at least 1 and at most N/39 (faiss wants >= 39 training points per centroid)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39 if n >= 39 else 1)))


def default_pq_m(dim: int, dims_per_code: int = 8) -> int:
    """The largest divisor of `dim` giving at least `dims_per_code` dims per sub-quantiser
    (768 -> 96, 384 -> 48, 192 -> 24)."""
    target = max(1, dim // dims_per_code)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def _sample_rows(mask_rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= mask_rows.size:
        return mask_rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(mask_rows, size=size, replace=False))


def _read_sample(ds, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Normalised vectors of the (sorted) `rows`, read slab by slab."""
    chosen = np.zeros(int(ds.sizes["patch"]), dtype=bool)
    chosen[rows] = True
    parts = [vectors for _, vectors in iter_embeddings(ds, chosen, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, int(ds.sizes["dim"])), np.float32)


def ivfpq_min_vectors(nlist: int, nbits: int) -> int:
    """Fewest training vectors faiss accepts for an IVF-PQ index: one per coarse centroid and one
    per PQ centroid (2**nbits); below that its k-means raises."""
    return max(nlist, 2 ** nbits)


def build_ivfpq(ds, selected: np.ndarray, dim: int, n: int, batch_size: int, seed: int, params: dict):
    faiss = _faiss()
    nlist = int(params.get("nlist", default_nlist(n)))
    m = int(params.get("m", default_pq_m(dim)))
    if dim % m:
        raise ValueError(f"PQ m={m} does not divide the dimension {dim}")
    nbits = int(params.get("nbits", 8))
    needed = ivfpq_min_vectors(nlist, nbits)
    if n < needed:
        raise StoreError(f"--index ivfpq needs at least {needed} vectors to train; this archive has {n}: use --index flat")
    refine = params.get("refine", "flat")
    # k-means wants >= 39 points per centroid; past ~64 per centroid more points barely help
    train_size = int(params.get("train_size", min(n, max(64 * nlist, 2 ** nbits * 39, 65_536), 256 * nlist)))
    train_size = min(train_size, n)
    if train_size < needed:
        raise ValueError(f"train_size={train_size} is below the {needed} vectors nlist={nlist}, nbits={nbits} need")
    sample = _read_sample(ds, _sample_rows(selected, train_size, seed), batch_size)
    quantizer = faiss.IndexFlatL2(dim)
    base = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_L2)
    base.cp.niter = int(params.get("niter", 10))
    base.cp.seed = seed
    base.own_fields = True
    quantizer.this.disown()
    if refine == "flat":
        index = faiss.IndexRefineFlat(base)
        base.this.disown()
        index.own_fields = True
    elif refine == "none":
        index = base
    else:
        raise ValueError(f"unknown refine {refine!r}; expected 'flat' or 'none'")
    index.train(sample)
    base.nprobe = int(params.get("nprobe", min(nlist, 32)))
    chosen = {"metric": "l2", "nlist": nlist, "m": m, "nbits": nbits, "refine": refine,
              "train_size": int(sample.shape[0]), "nprobe": int(base.nprobe)}
    if refine == "flat":
        index.k_factor = float(params.get("k_factor", 8.0))
        chosen["k_factor"] = float(index.k_factor)
    return index, chosen


# -- what an index keeps: full vectors, memory ------------------------------------------------------


def full_storage(index, kind: str):
    """The flat storage of the full vectors an index keeps (IndexFlat itself, IndexHNSWFlat's
    storage, IndexRefineFlat's refine index), None if it keeps none."""
    faiss = _faiss()
    if kind == "flat":
        return index
    if kind == "hnsw":
        return faiss.downcast_index(index.storage)
    if hasattr(index, "refine_index"):
        return faiss.downcast_index(index.refine_index)
    return None


def proxy_queries(index, kind: str, n_queries: int, seed: int) -> np.ndarray:
    """Tuning queries: archive vectors perturbed by noise of the size of their distance to their
    nearest neighbour (so that none is its own trivial top hit), normalised. Without full vectors
    (refine="none") the PQ reconstructions themselves."""
    from rsretrieve.store.read import normalise_rows

    rng = np.random.default_rng(seed)
    ids = rng.choice(index.ntotal, size=min(n_queries, index.ntotal), replace=False)
    storage = full_storage(index, kind)
    if storage is None:
        if not hasattr(index, "reconstruct"):
            raise ValueError("cannot draw tuning queries")
        return normalise_rows(np.stack([index.reconstruct(int(i)) for i in ids]))
    vectors = np.stack([storage.reconstruct(int(i)) for i in ids])
    _, nn = storage.search(vectors, 2)
    neighbours = np.stack([storage.reconstruct(int(j)) for j in nn[:, 1]])
    spread = np.linalg.norm(vectors - neighbours, axis=1, keepdims=True)
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise *= spread / np.sqrt(vectors.shape[1])
    return normalise_rows(vectors + noise)


def memory_bytes(index, kind: str) -> int:
    """Bytes of the index's own arrays: vectors (flat), graph links + vectors (hnsw), PQ codes +
    64-bit ids + refine vectors (ivfpq). What `rsretrieve index` reports per vector."""
    faiss = _faiss()
    if kind == "flat":
        return int(index.ntotal * index.code_size)
    if kind == "hnsw":
        storage = faiss.downcast_index(index.storage)
        return int(storage.ntotal * storage.code_size + graph_bytes(index.hnsw))
    base = faiss.downcast_index(index.base_index) if hasattr(index, "base_index") else index
    total = base.ntotal * (base.code_size + 8) + base.nlist * base.d * 4 + base.precomputed_table.size() * 4
    if hasattr(index, "refine_index"):
        refine = faiss.downcast_index(index.refine_index)
        total += refine.ntotal * refine.code_size
    return int(total)


def graph_bytes(hnsw) -> int:
    """Bytes of an HNSW graph's links: neighbour ids (int32), levels (int32), offsets (uint64)."""
    return int(hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8)
