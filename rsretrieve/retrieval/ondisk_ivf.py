"""faiss primitives of the ``ivfpq-disk`` index: IVF-PQ whose inverted lists live on disk.

Only the OPQ rotation, the coarse quantizer and the PQ codebooks are in index.faiss; the PQ codes and ids (64 + 8 B a
vector at 768-d, PQ64) are in index.ivfdata, faiss's `OnDiskInvertedLists`, memory-mapped read-only
on load (the page cache holds what searches touch). faiss ids are the store rows, so no id map is
kept. The PQ shortlist of k * k_factor candidates is re-ranked exactly with vectors read from the
store (`RowReader`), so scores are exact cosines.

The steps, each usable on its own (`ondisk_index.OnDiskIndex.build_from` chains them, running
`add_slice` in-process or, given a Dask mapper from `rsretrieve.indexer.index_build`, on workers):

    index = train_empty(sample, params)             # coarse k-means + PQ on a sample
    write_index(index, "trained.faiss")
    result = add_slice(SliceTask(...))               # one part file per slice of store rows
    merged = merge_parts("trained.faiss", parts, "index.ivfdata")
    index = load_ondisk("index.faiss")               # mmapped, instant
    scores, rows = search_reranked(index, reader, queries, k, k_factor)

Parts are merged by `merge_lists`, as `faiss.contrib.ondisk.merge_ondisk` does
(`OnDiskInvertedLists.merge_from_multiple` over the parts read with IO_FLAG_MMAP), but reading each
part with IO_FLAG_SKIP_PRECOMPUTE_TABLE: faiss recomputes IVF-PQ's precomputed table on every read
(nlist * M * 256 floats: 1 GB at nlist 16384, per part), which merge_ondisk would pay once per part.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsretrieve.errors import StoreError
from rsretrieve.retrieval.ivfpq import default_pq_m
from rsretrieve.retrieval.rerank import TopK
from rsretrieve.store.read import normalise_rows

KIND = "ivfpq-disk"
SLICE_ROWS = 262_144  # most rows per part: ~19 MB of codes at PQ64, a minute or so of work each
POINTS_PER_CENTROID = 40  # faiss's k-means warns below 39
# The training sample is held whole on the client as float32 (rotated in place, `train_empty`):
# 4 GiB is 1.4 M vectors of 768-d, 40 for each of 32,768 centroids, within a 6 GB machine.
TRAIN_BYTES = 4 << 30
HNSW_QUANTIZER_FROM = 4096  # nlist from which an HNSW coarse quantizer assigns faster than a flat one (2 cores, 768-d)


def _faiss():
    import faiss

    return faiss


# -- parameters ------------------------------------------------------------------------------------


def disk_nlist(n: int, dim: int = 768) -> int:
    """The power of two nearest 4*sqrt(N), halved until every centroid has 40 training points
    within the training sample's budget (768-d: 1M -> 4096, 10M -> 16384, 100M -> 32768, Major
    TOM Core's 144M -> 32768 where 4*sqrt(N) alone would give 65536 and a 10 GB sample)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    while nlist > 1 and nlist * POINTS_PER_CENTROID > min(n, max_train_points(dim)):
        nlist //= 2
    return nlist


def max_train_points(dim: int) -> int:
    """The most training vectors the client holds: TRAIN_BYTES of float32."""
    return TRAIN_BYTES // (4 * dim)


def disk_params(n: int, dim: int, overrides: dict) -> dict:
    """Build parameters for N vectors of `dim`; `overrides` wins. PQ with ~12 dims per byte (768 ->
    PQ64: 64 B codes), an HNSW coarse quantizer from nlist 4096 (assigning 10M vectors to 16384
    flat centroids costs ~1e14 MACs; HNSW32 assigns ~20k vectors/s on 2 cores)."""
    nlist = int(overrides.get("nlist", disk_nlist(n, dim)))
    nbits = int(overrides.get("nbits", 8))
    m = int(overrides.get("m", default_pq_m(dim, dims_per_code=12)))
    if dim % m:
        raise ValueError(f"PQ m={m} does not divide the dimension {dim}")
    needed = max(nlist, 2 ** nbits)
    if n < needed:
        raise StoreError(f"--index {KIND} needs at least {needed} vectors to train; this archive has {n}: use --index flat")
    quantizer = overrides.get("quantizer", "hnsw" if nlist >= HNSW_QUANTIZER_FROM else "flat")
    if quantizer not in ("hnsw", "flat"):
        raise ValueError(f"unknown quantizer {quantizer!r}; expected 'hnsw' or 'flat'")
    train_size = min(n, int(overrides.get("train_size", min(max_train_points(dim), max(POINTS_PER_CENTROID * nlist, 39 * 2 ** nbits)))))
    return {"metric": "l2", "nlist": nlist, "m": m, "nbits": nbits, "quantizer": quantizer,
            "hnsw_m": int(overrides.get("hnsw_m", 32)), "train_size": train_size, "niter": int(overrides.get("niter", 10)),
            "nprobe": int(overrides.get("nprobe", min(nlist, 32))), "k_factor": float(overrides.get("k_factor", 4.0)),
            "opq": bool(overrides.get("opq", True)), "opq_niter": int(overrides.get("opq_niter", 25)),
            "slice_rows": int(overrides.get("slice_rows", slice_rows(n))), "prefetch_threads": int(overrides.get("prefetch_threads", 0)),
            "rerank": "store"}


def slice_rows(n: int) -> int:
    """Rows per part: ~32 parts, so that every worker has work and a slow one delays little, each
    between 16,384 and 262,144 rows (19 MB of PQ64 codes)."""
    return int(min(SLICE_ROWS, max(16_384, -(-n // 32))))


# -- faiss plumbing --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_stdout():
    """Silence what faiss's C++ prints on stdout (OnDiskInvertedLists announces every resize and
    every redirected file name), which would otherwise land in `--format json` output."""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to silence
        yield
        return
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def gpu_count() -> int:
    try:
        faiss = _faiss()
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # noqa: BLE001 — a GPU is an optimisation, never a requirement
        return 0


def read_trained(path: str | Path, mapped: bool = False):
    """A trained (empty or part) index file, without IVF-PQ's precomputed table (see module doc);
    `mapped`: its lists memory-mapped read-only (a part being merged), else in RAM (to add to)."""
    faiss = _faiss()
    return faiss.read_index(str(path), (faiss.IO_FLAG_MMAP if mapped else 0) | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)


def write_index(index, path: str | Path) -> None:
    _faiss().write_index(index, str(path))


def ivf_of(index):
    faiss = _faiss()
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def set_nprobe(index, nprobe: int) -> None:
    """nprobe, and the HNSW quantizer's efSearch with it (it must find nprobe centroids)."""
    faiss = _faiss()
    ivf = ivf_of(index)
    ivf.nprobe = int(nprobe)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(32, 2 * int(nprobe))


# -- training --------------------------------------------------------------------------------------


def train_empty(sample: np.ndarray, params: dict, seed: int = 0, use_gpu: bool = True, gpu_problems: list[str] | None = None):
    """An empty IndexIVFPQ (L2 on unit vectors), behind an OPQ rotation if `params["opq"]`,
    trained on `sample` (normalised float32, C-contiguous). With OPQ the sample is rotated in place
    (it is the caller's to drop after): faiss's own `IndexPreTransform.train` would hold a rotated
    copy beside it, 2 GB more at 10 M vectors. Why a GPU could not train is added to `gpu_problems`."""
    faiss = _faiss()
    if sample.dtype != np.float32 or not sample.flags.c_contiguous:
        raise ValueError("train_empty needs a C-contiguous float32 sample (it may rotate it in place)")
    dim = int(sample.shape[1])
    if params["quantizer"] == "hnsw":
        quantizer = faiss.IndexHNSWFlat(dim, params["hnsw_m"])
    else:
        quantizer = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"], faiss.METRIC_L2)
    ivf.own_fields = True
    quantizer.this.disown()
    # no precomputed table: nlist * M * 256 floats would sit in RAM beside ~72 B/vector of codes
    ivf.use_precomputed_table = -1
    ivf.cp.niter = params["niter"]
    ivf.cp.seed = seed
    rotation = None
    if params.get("opq"):
        # a learnt rotation that balances the variance over the M sub-vectors: on clustered 768-d
        # vectors (1M) the true top 10 are in the top 20 of PQ64 for 99.6 % instead of 79.8 %, so
        # re-ranking reads 2-4x fewer rows (BENCHMARKS.md)
        rotation = faiss.OPQMatrix(dim, params["m"])
        rotation.niter = params["opq_niter"]
        rotation.train(sample)  # on a subsample of its own (max_train_points)
        for start in range(0, len(sample), 65_536):
            sample[start:start + 65_536] = rotation.apply(sample[start:start + 65_536])
    assigner, problem = _kmeans_assigner(dim, params, use_gpu)
    if problem and gpu_problems is not None:
        gpu_problems.append(problem)
    if assigner is not None:  # the k-means step that dominates training: nlist centroids x the sample
        ivf.clustering_index = assigner
    ivf.train(sample)
    ivf.clustering_index = None
    if rotation is None:
        return ivf
    index = faiss.IndexPreTransform(rotation, ivf)  # trained parts: trained whole
    index.own_fields = True
    rotation.this.disown()
    ivf.this.disown()
    return index


def _kmeans_assigner(dim: int, params: dict, use_gpu: bool) -> tuple[object | None, str | None]:
    """(what k-means assigns points with, why not on the GPU when one was there): a GPU flat index
    where faiss has a GPU, an HNSW graph rebuilt each iteration for large nlist (16384 centroids:
    ~10x faster than flat on 2 cores), else faiss's default (flat)."""
    from rsretrieve.retrieval.gpu import failure, gpu_copy

    faiss = _faiss()
    problem = None
    if use_gpu and gpu_count() > 0:
        try:
            return gpu_copy(faiss.IndexFlatL2(dim)), None
        except Exception as exc:  # noqa: BLE001 — a GPU is an optimisation: train on the CPU, and say so
            problem = failure("the k-means assignment", exc)
    if params["quantizer"] == "hnsw":
        return faiss.IndexHNSWFlat(dim, params["hnsw_m"]), problem
    return None, problem


def read_vectors(reader, rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Normalised float32 vectors of `rows` (in order) through `reader.read`, batch by batch; a row
    that is not finite (not encoded) is a StoreError."""
    out = np.empty((rows.size, reader.dim), np.float32)
    for start in range(0, rows.size, batch_size):
        part = rows[start:start + batch_size]
        block = reader.read(part)
        if not np.isfinite(block).all():
            bad = part[~np.isfinite(block).all(axis=1)][:3].tolist()
            raise StoreError(f"embeddings of rows {bad} are not finite (not encoded yet?)")
        out[start:start + part.size] = normalise_rows(block)
    return out


# -- adding: one part per slice of rows --------------------------------------------------------------


# A worker holds several float32 copies of the batch it encodes (read, normalised, rotated by OPQ,
# residuals): 65,536 rows made a worker 1.2 GB at 10 M vectors, 16,384 keep it near 0.5 GB at no
# cost in speed (faiss parallelises within a batch of that size as well).
ADD_BATCH = 16_384


@dataclass(frozen=True)
class SliceTask:
    """One slice of store rows to encode into a part file (picklable: it goes to a Dask worker)."""

    group_path: str  # the store group (`RowReader` opens it)
    trained_path: str  # the trained empty index
    part_path: str  # where the part goes
    rows: np.ndarray  # store rows of this slice, sorted (the faiss ids)
    queries: np.ndarray | None = None  # tuning queries: the slice's exact top-k for them comes back
    k: int = 10
    batch_size: int = ADD_BATCH  # rows encoded at a time
    threads: int | None = None  # faiss OpenMP threads (a worker's share of its cores)
    use_gpu: bool = True  # assign vectors to lists on a GPU where faiss has one


@dataclass
class SliceResult:
    part_path: str | None  # None: nothing to add in this slice
    count: int
    scores: np.ndarray | None  # (Q, k) exact cosines of the tuning queries' top-k in this slice
    rows: np.ndarray | None  # (Q, k) their store rows (-1: fewer than k)
    seconds: float
    gpu_problem: str | None = None  # why the vectors were assigned on the CPU although a GPU was there


def add_slice(task: SliceTask) -> SliceResult:
    """Encode the slice's vectors into a copy of the trained index and write it to `part_path`;
    with tuning queries, also their exact top-k among these vectors (the same read serves both)."""
    from rsretrieve.store.rows import RowReader

    t0 = time.perf_counter()
    faiss = _faiss()
    if task.threads:
        faiss.omp_set_num_threads(int(task.threads))
    index = read_trained(task.trained_path)
    set_nprobe(index, 1)  # efSearch 32 for the assignment of each vector to its list
    assigner, problem = gpu_assigner(index, task.use_gpu)
    reader = RowReader(task.group_path)
    best = TopK(task.queries, task.k)
    rows = np.asarray(task.rows, np.int64)
    for start in range(0, rows.size, task.batch_size):
        ids = rows[start:start + task.batch_size]
        vectors = read_vectors(reader, ids, ids.size)
        add_vectors(index, vectors, ids, assigner)
        best.update(vectors, ids)
    if rows.size:
        write_index(index, task.part_path)
    return SliceResult(task.part_path if rows.size else None, int(rows.size), best.scores, best.rows, time.perf_counter() - t0, problem)


def gpu_assigner(index, use_gpu: bool = True) -> tuple[object | None, str | None]:
    """(a GPU flat index of the coarse centroids where faiss has a GPU, else None: faiss assigns on
    the CPU; why not, when a GPU was there). Assigning vectors to their lists is most of the cost of
    adding; PQ encoding is cheap."""
    from rsretrieve.retrieval.gpu import failure, gpu_copy

    if not use_gpu or gpu_count() == 0:
        return None, None
    try:
        faiss = _faiss()
        ivf = ivf_of(index)
        flat = faiss.IndexFlatL2(ivf.d)
        flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        return gpu_copy(flat), None
    except Exception as exc:  # noqa: BLE001 — a GPU is an optimisation: assign on the CPU, and say so
        return None, failure("the list assignment", exc)


def add_vectors(index, vectors: np.ndarray, ids: np.ndarray, assigner=None) -> None:
    """`add_with_ids`, or with the lists `assigner` (a flat index of the centroids) picks."""
    if assigner is None:
        index.add_with_ids(vectors, ids)
        return
    faiss = _faiss()
    if isinstance(index, faiss.IndexPreTransform):  # the lists are found, and the codes made, in the rotated space
        for i in range(index.chain.size()):
            vectors = faiss.downcast_VectorTransform(index.chain.at(i)).apply(np.ascontiguousarray(vectors, np.float32))
    _, lists = assigner.search(vectors, 1)
    vectors, ids, lists = np.ascontiguousarray(vectors, np.float32), np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(lists[:, 0])
    ivf_of(index).add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.ntotal = ivf_of(index).ntotal


# -- merging ---------------------------------------------------------------------------------------


def merge_lists(empty, sources: list, ivfdata_path: str | Path):
    """`empty` (a trained index holding nothing) with the inverted lists of `sources` (part files,
    or InvertedLists such as a loaded index's) merged into one OnDiskInvertedLists at
    `ivfdata_path`. Ids are kept as they are (they are store rows)."""
    faiss = _faiss()
    ivf = ivf_of(empty)
    if ivf.ntotal:
        raise ValueError("merge_lists needs an empty trained index")
    keep, lists = [], faiss.InvertedListsPtrVector()
    for source in sources:
        if isinstance(source, (str, Path)):
            part = read_trained(source, mapped=True)  # the part's lists are mapped, not loaded
            keep.append(part)
            source = ivf_of(part).invlists
        lists.push_back(source)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata_path))
    with quiet_stdout():
        ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    ivf.replace_invlists(merged, True)
    merged.this.disown()
    empty.ntotal = ivf.ntotal = ntotal
    del keep
    return empty


def merge_parts(trained_path: str | Path, part_paths: list, ivfdata_path: str | Path):
    """The trained index with every part's lists merged on disk at `ivfdata_path`."""
    return merge_lists(read_trained(trained_path), [str(p) for p in part_paths], ivfdata_path)


def write_trained_copy(index, path: str | Path) -> None:
    """Write the index's trained quantizer and codebooks, holding nothing, to `path`: what new parts
    are encoded with when the index grows (no retraining). Its own lists are put back after."""
    faiss = _faiss()
    ivf = ivf_of(index)
    lists, owned, ntotal = ivf.invlists, ivf.own_invlists, ivf.ntotal
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False  # replace_invlists must not free the real lists
    ivf.replace_invlists(empty, False)
    index.ntotal = ivf.ntotal = 0
    try:
        write_index(index, path)
    finally:
        ivf.replace_invlists(lists, owned)
        index.ntotal = ivf.ntotal = ntotal


def load_ondisk(index_path: str | Path):
    """Read index.faiss with its OnDiskInvertedLists mapped read-only from the index.ivfdata beside
    it (IO_FLAG_ONDISK_SAME_DIR: the folder may have been renamed since it was written)."""
    faiss = _faiss()
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    with quiet_stdout():
        index = faiss.read_index(str(Path(index_path).resolve()), flags)
    return index


def ondisk_lists(index):
    """The index's OnDiskInvertedLists (None if its lists are in RAM)."""
    faiss = _faiss()
    lists = faiss.downcast_InvertedLists(ivf_of(index).invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def set_prefetch(index, threads: int) -> None:
    """Threads faiss starts at each search to touch the probed lists' pages ahead of the scan (32 by
    default): worth it on a cold disk, a quarter of the search time lost when the page cache holds
    the lists (measured on 2 cores), hence 0 by default (`params["prefetch_threads"]`)."""
    lists = ondisk_lists(index)
    if lists is not None:
        lists.prefetch_nthread = int(threads)
