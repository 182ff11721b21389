"""faiss on GPUs: which part of an index goes to the GPU, and why not when it cannot.

- `flat`: the whole index is copied to every GPU.
- `ivfpq` (IVF-PQ wrapped in `IndexRefineFlat`, which faiss cannot clone to a GPU): the inner
  IVF-PQ is searched on the GPU and its candidates re-ranked exactly on the CPU, against the full
  vectors the refine index keeps.
- `ivfpq-disk` (lists on disk): trained on the GPU (`ondisk_ivf.train_empty`'s k-means) and its
  vectors assigned to lists there (`add_slice`, on encoder slots); it searches on the CPU, where
  its lists are mapped (a GPU coarse quantizer would have to be swapped into the index that is
  also saved: not done before it can be measured on a GPU).
- `hnsw`: faiss has no GPU HNSW; it searches on the CPU.

`to_gpu` never fails: a GPU is an optimisation. When no GPU index can be made it returns the CPU
index and a one-line notice saying why, which the caller shows (never a silent fallback).
"""

from __future__ import annotations


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


ON_CPU = {"hnsw": "faiss has no GPU HNSW index",
          "ivfpq-disk": "an ivfpq-disk index searches its lists where they are mapped, on the CPU (it trained on the GPU)"}


def to_gpu(index, kind: str) -> tuple[object, str | None]:
    """(the index to search with, a one-line notice or None): the GPU form of `index` (module
    docstring), or `index` itself and why it searches on the CPU."""
    reason = why_no_gpu()
    if reason is None and kind in ON_CPU:
        reason = ON_CPU[kind]
    if reason is not None:
        return index, f"--gpu-search: searching on the CPU: {reason}"
    try:
        if hasattr(index, "refine_index"):
            return _refine_on_cpu(index), None
        return _faiss().index_cpu_to_all_gpus(index), None
    except Exception as exc:  # noqa: BLE001 — said in one line; the CPU index still answers
        return index, f"--gpu-search: searching on the CPU: faiss could not put the {kind} index on the GPU ({' '.join(str(exc).split())[:160]})"


def _refine_on_cpu(refine):
    """IndexRefineFlat whose base (the IVF-PQ) is a GPU clone; the exact re-rank stays on the CPU.
    Shares the CPU refine's full vectors and k_factor; the CPU index is untouched."""
    faiss = _faiss()
    base = faiss.index_cpu_to_all_gpus(faiss.downcast_index(refine.base_index))  # nprobe comes with the clone
    out = faiss.IndexRefine(base, refine.refine_index)
    out.k_factor = refine.k_factor
    out.own_fields = out.own_refine_index = False
    out.referenced_objects = [base, refine]  # faiss's own way of keeping both alive as long as the wrapper
    return out
