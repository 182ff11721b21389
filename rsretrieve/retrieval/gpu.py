"""faiss on GPUs: which part of an index goes to the GPU, and why not when it cannot.

- `flat`: the whole index is copied to every GPU.
- `ivfpq` (IVF-PQ wrapped in `IndexRefineFlat`, which faiss cannot clone to a GPU): the inner
  IVF-PQ is searched on the GPU and its candidates re-ranked exactly on the CPU, against the full
  vectors the refine index keeps.
- `ivfpq-disk` (lists on disk): trained on the GPU (`ondisk_ivf.train_empty`'s k-means) and its
  vectors assigned to lists there (`add_slice`, on encoder slots). A loaded index searches with a
  GPU copy of its coarse centroids (`CoarseOnGpu`): the queries are assigned to lists there, in one
  call per batch; the lists are scanned on the CPU where they are mapped (`search_preassigned`), and
  the shortlist re-ranked exactly from the store as on the CPU. The index itself keeps its CPU
  quantizer, so `save` and `extend` write what they would without a GPU. (Swapping the GPU copy in
  as the index's quantizer would not do: IVF-PQ asks its quantizer for a centroid per probed list
  per query, from every OpenMP thread at once, and a GPU index is not thread-safe.)
- `hnsw`: faiss has no GPU HNSW; it searches on the CPU.

`to_gpu` and `coarse_on_gpu` never fail: a GPU is an optimisation. When no GPU form can be made
they return the CPU index and a one-line notice saying why, which the caller shows (never a silent
fallback); `rsretrieve index --gpu-search` shows the same notice for what it builds.
"""

from __future__ import annotations

import numpy as np


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    """GPUs faiss can use here: 0 for a faiss-cpu build."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def why_no_gpu() -> str | None:
    """Why faiss cannot use a GPU in this process, or None if it can."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return f"this faiss ({getattr(faiss, '__version__', '?')}) is a CPU-only build (faiss-cpu); install faiss-gpu"
    if gpu_count() == 0:
        return "faiss sees no GPU on this machine (CUDA_VISIBLE_DEVICES, driver?)"
    return None


ON_CPU = {"hnsw": "faiss has no GPU HNSW index"}


def notice(reason: str | None, doing: str = "searching") -> str | None:
    """The one line `--gpu-search` shows when `reason` kept it on the CPU (None: it did not)."""
    return None if reason is None else f"--gpu-search: {doing} on the CPU: {reason}"


def failure(what: str, exc: Exception) -> str:
    """Why a GPU copy failed, in one line (faiss's messages span several)."""
    return f"faiss could not put {what} on the GPU ({' '.join(str(exc).split())[:160]})"


def gpu_copy(index):
    """`index` copied to every GPU faiss sees (the one place a GPU copy is made; tests stand a CPU
    clone in for it)."""
    return _faiss().index_cpu_to_all_gpus(index)


def to_gpu(index, kind: str) -> tuple[object, str | None]:
    """(the index to search with, a one-line notice or None): the GPU form of `index` (module
    docstring), or `index` itself and why it searches on the CPU."""
    reason = why_no_gpu()
    if reason is None and kind in ON_CPU:
        reason = ON_CPU[kind]
    if reason is not None:
        return index, notice(reason)
    try:
        if hasattr(index, "refine_index"):
            return _refine_on_cpu(index), None
        return gpu_copy(index), None
    except Exception as exc:  # noqa: BLE001 — said in one line; the CPU index still answers
        return index, notice(failure(f"the {kind} index", exc))


def _refine_on_cpu(refine):
    """IndexRefineFlat whose base (the IVF-PQ) is a GPU clone; the exact re-rank stays on the CPU.
    Shares the CPU refine's full vectors and k_factor; the CPU index is untouched."""
    faiss = _faiss()
    base = gpu_copy(faiss.downcast_index(refine.base_index))  # nprobe comes with the clone
    out = faiss.IndexRefine(base, refine.refine_index)
    out.k_factor = refine.k_factor
    out.own_fields = out.own_refine_index = False
    out.referenced_objects = [base, refine]  # faiss's own way of keeping both alive as long as the wrapper
    return out


# -- ivfpq-disk: the coarse quantizer on the GPU ----------------------------------------------------
# search_preassigned parallelises over queries in this mode only (in mode 0, the default,
# IndexIVF.search splits the queries itself and search_preassigned runs on one thread)
SPLIT_QUERIES = 3


def coarse_on_gpu(index, kind: str) -> tuple[object, str | None]:
    """(what to search with, a one-line notice or None): a `CoarseOnGpu` over `index` (an IVF
    index, behind its OPQ rotation or not), or `index` itself and why it searches on the CPU."""
    reason = why_no_gpu()
    if reason is not None:
        return index, notice(reason)
    faiss = _faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    try:
        centroids = faiss.IndexFlat(ivf.d, ivf.metric_type)  # an HNSW quantizer's graph has no GPU form: its centroids do
        centroids.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        return CoarseOnGpu(index, gpu_copy(centroids)), None
    except Exception as exc:  # noqa: BLE001 — said in one line; the CPU index still answers
        return index, notice(failure(f"the {kind} index's coarse quantizer", exc))


class CoarseOnGpu:
    """Searches `index` (an IVF index, behind its OPQ rotation or not) with its queries assigned to
    lists by `quantizer` (the coarse centroids on the GPU), one call per batch; the lists are
    scanned on the CPU. `index` is not changed: its CPU quantizer is what `save` writes."""

    def __init__(self, index, quantizer):
        self.index, self.quantizer = index, quantizer

    def on(self, index) -> "CoarseOnGpu":
        """The same GPU centroids over another index with the same trained quantizer (a grown one)."""
        return CoarseOnGpu(index, self.quantizer)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index))
        x = rotated(self.index, np.ascontiguousarray(queries, np.float32))
        coarse_distances, lists = self.quantizer.search(x, int(min(ivf.nprobe, ivf.nlist)))
        mode, ivf.parallel_mode = ivf.parallel_mode, SPLIT_QUERIES  # not saved (index.faiss does not hold it)
        try:
            return ivf.search_preassigned(x, k, lists, coarse_distances)
        finally:
            ivf.parallel_mode = mode


def rotated(index, x: np.ndarray) -> np.ndarray:
    """`x` through the index's pre-transforms (the OPQ rotation), as the IVF index sees it."""
    faiss = _faiss()
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(np.ascontiguousarray(x, np.float32))
    return x
