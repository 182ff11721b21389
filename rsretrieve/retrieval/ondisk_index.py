"""`OnDiskIndex`: the ``ivfpq-disk`` kind of `EmbeddingIndex` (faiss primitives: `ondisk_ivf`).

    index = EmbeddingIndex.build(store_path, "s2", kind="ivfpq-disk")            # parts built in-process
    index = build_index(client, store_path, "s2")                               # parts on Dask workers
    index.save(directory, store_id=...)                                         # index.faiss + index.ivfdata
    index = EmbeddingIndex.load(directory, store_path=store_path)               # mmapped, instant
    scores, rows = index.search(queries, 10)                                    # exact cosines, store rows
    index.extend(store_path, "s2", new_rows)                                    # one more part, merged

faiss ids are store rows: `rows` and `patch_ids` are read only when asked (all ids from the
inverted lists, patch ids from the store); `search_patch_ids` reads the hits' ids alone.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.retrieval import ondisk_ivf as disk
from rsretrieve.retrieval import rerank
from rsretrieve.retrieval.faiss_index import ON_DISK, EmbeddingIndex
from rsretrieve.retrieval.index_meta import INDEX_FILE, IVFDATA_FILE
from rsretrieve.retrieval.ivfpq import graph_bytes
from rsretrieve.store.read import as_strings, normalise_rows

TUNING_QUERIES = 500
TUNING_FACTORS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
TUNING_PROBES = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class OnDiskIndex(EmbeddingIndex):
    """IVF-PQ with its lists on disk, re-ranked exactly from the store (module docstring)."""

    def __init__(self, index, store_path: str | Path, modality: str, params: dict, provenance: dict | None = None,
                 selection: dict | None = None, n_store_rows: int | None = None, ivfdata: str | Path | None = None,
                 work_dir: str | Path | None = None):
        from rsretrieve.store.rows import RowReader

        self._rows = self._patch_ids = None
        super().__init__(index, None, None, disk.KIND, params, provenance, selection, n_store_rows, modality, use_gpu=False)
        self.store_path = Path(store_path)
        self.vectors = RowReader(self.store_path / modality)
        self._ivfdata = Path(ivfdata) if ivfdata else None
        self._own_work(work_dir)
        disk.set_nprobe(index, int(self.params["nprobe"]))
        disk.set_prefetch(index, int(self.params.get("prefetch_threads", 0)))

    def _own_work(self, work_dir) -> None:
        """A build's folder (its index.ivfdata until `save` moves it) is removed with the object."""
        self._work = Path(work_dir) if work_dir else None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._work), True) if self._work else None

    # -- ids, read only when asked -------------------------------------------------------------------
    @property
    def rows(self) -> np.ndarray:
        if self._rows is None:
            self._rows = all_ids(self.cpu_index)
        return self._rows

    @rows.setter
    def rows(self, value) -> None:
        self._rows = None if value is None else np.asarray(value, np.int64)

    @property
    def patch_ids(self) -> np.ndarray:
        if self._patch_ids is None:
            self._patch_ids = self._read_patch_ids(self.rows)
        return self._patch_ids

    @patch_ids.setter
    def patch_ids(self, value) -> None:
        self._patch_ids = None if value is None else as_strings(value)

    def _read_patch_ids(self, rows: np.ndarray) -> np.ndarray:
        """Patch ids of store rows, read for those rows only (str(row) where the store has none)."""
        from rsretrieve.store import EmbeddingStore

        group = EmbeddingStore(self.store_path).zarr_group(self.modality)
        if "patch_id" not in group or not rows.size:
            return as_strings(rows)
        distinct, inverse = np.unique(rows, return_inverse=True)
        return as_strings(np.asarray(group["patch_id"].get_orthogonal_selection((distinct,)))[inverse])

    # -- search ------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q, k = self._normalised_queries(queries, k)
        return rerank.search_reranked(self.cpu_index, self.vectors, q, k, float(self.params["k_factor"]), search=self._search_index.search)

    def _on_gpu(self) -> None:
        """Assign queries to lists on the GPU (`gpu.CoarseOnGpu`: the lists are scanned on the CPU,
        the shortlist re-ranked from the store), or say why not. `cpu_index` keeps its CPU
        quantizer: it is what `save` writes. Called by `load` only: a build searches on the CPU."""
        from rsretrieve.retrieval.gpu import coarse_on_gpu

        self._search_index, self.gpu_notice = coarse_on_gpu(self.cpu_index, self.kind)

    def search_patch_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.search(queries, k)
        ids = np.full(rows.shape, "", dtype=object)
        found = rows >= 0
        ids[found] = self._read_patch_ids(rows[found])
        return scores, ids

    def set_search_params(self, **params) -> None:
        if "nprobe" in params:
            disk.set_nprobe(self.cpu_index, int(params["nprobe"]))
            self.params["nprobe"] = int(params["nprobe"])
        if "k_factor" in params:
            self.params["k_factor"] = float(params["k_factor"])

    def exact_search(self, normalised_queries: np.ndarray, k: int) -> np.ndarray:
        """Exact neighbours (store rows), by streaming every indexed row from the store."""
        return exact_topk(self.vectors, self.rows, normalised_queries, k)[1]

    def tune(self, target_recall: float = 0.95, k: int = 10, n_queries: int = TUNING_QUERIES, seed: int = 0,
             margin: float = 0.02, queries: np.ndarray | None = None, truth: np.ndarray | None = None) -> float:
        """Cheapest (k_factor, then nprobe) whose recall@k after re-ranking reaches target + margin
        on proxy queries. A build passes `queries` and their exact `truth` (found while adding);
        otherwise they are drawn from a sample and the truth streamed from the store."""
        if queries is None or truth is None:
            sample = disk.read_vectors(self.vectors, sample_rows(self.rows, 20 * n_queries, seed), 65_536)
            queries = tuning_queries(sample, n_queries, seed)
            truth = exact_topk(self.vectors, self.rows, queries, k)[1]
        nprobe, factor, reached = tune_search(self.cpu_index, queries, truth, k, min(target_recall + margin, 0.999))
        self.set_search_params(nprobe=nprobe, k_factor=factor)
        self.params["tuned_recall"] = round(float(reached), 4)
        self.params["target_recall"] = target_recall
        return reached

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build_from(cls, ds, modality: str, selected: np.ndarray, store_path: str | Path, *, seed: int = 0,
                   tune: bool = True, target_recall: float = 0.95, batch_size: int = 65_536, mapper=None,
                   work_dir: str | Path | None = None, use_gpu: bool = True, selection: dict | None = None,
                   **overrides) -> "OnDiskIndex":
        """Train on a sample, add the selected rows slice by slice into part files (`mapper(fn,
        tasks)`: a Dask map, or in order here), merge the parts on disk, tune on the way."""
        from rsretrieve.store.read import provenance_of
        from rsretrieve.store.rows import RowReader

        store_path = Path(store_path)
        reader = RowReader(store_path / modality)
        params = disk.disk_params(int(selected.size), reader.dim, overrides)
        tuning = tune and not ("nprobe" in overrides and "k_factor" in overrides)
        work = _work_dir(work_dir or store_path.parent, modality)
        try:
            t0 = time.perf_counter()
            sample = disk.read_vectors(reader, sample_rows(selected, params["train_size"], seed), batch_size)
            queries = tuning_queries(sample, TUNING_QUERIES, seed) if tuning else None
            gpu_problems: list[str] = []
            trained = disk.train_empty(sample, params, seed, use_gpu, gpu_problems)  # rotates the sample in place
            del sample
            disk.write_index(trained, work / "trained.faiss")
            t1 = time.perf_counter()
            results = _add_parts(store_path / modality, work, selected, params["slice_rows"], queries, batch_size, mapper, use_gpu)
            t2 = time.perf_counter()
            index = disk.merge_parts(work / "trained.faiss", [r.part_path for r in results if r.part_path], work / IVFDATA_FILE)
            _remove_parts(work)
            params["build_s"] = {"train": round(t1 - t0, 2), "add": round(t2 - t1, 2), "merge": round(time.perf_counter() - t2, 2)}
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        out = cls(index, store_path, modality, params, provenance_of(ds), selection, int(ds.sizes["patch"]), work / IVFDATA_FILE, work)
        if tuning:
            truth = rerank.merge_topk([(r.scores, r.rows) for r in results if r.scores is not None], 10)[1]
            out.tune(target_recall=target_recall, seed=seed, queries=queries, truth=truth)
        out.params["bytes_per_vector"] = round(ram_bytes(index) / max(1, index.ntotal), 1)
        gpu_problems += [r.gpu_problem for r in results if r.gpu_problem]
        out.gpu_notice = _training_notice(gpu_problems) if use_gpu else None
        return out

    def extend(self, source=None, modality: str | None = None, rows=None, *, batch_size: int = 65_536, mapper=None,
               work_dir: str | Path | None = None) -> int:
        """Add the store rows `rows` (rows the index has not seen: at or past `n_store_rows`) as one
        more part encoded with the trained quantizer, merged with the existing lists into a new
        index.ivfdata (old codes are copied, never re-encoded). Returns the number added."""
        from rsretrieve.store.rows import RowReader

        new, n_rows = self._new_rows(source, modality, rows)
        self.vectors = RowReader(self.store_path / self.modality)  # the group's new shape
        if not new.size:
            self.n_store_rows = n_rows
            return 0
        work = _work_dir(work_dir or (self._ivfdata.parent.parent if self._ivfdata else self.store_path.parent), self.modality)
        try:
            disk.write_trained_copy(self.cpu_index, work / "trained.faiss")
            results = _add_parts(self.store_path / self.modality, work, new, int(self.params.get("slice_rows", disk.SLICE_ROWS)),
                                 None, batch_size, mapper)
            merged = disk.merge_lists(disk.read_trained(work / "trained.faiss"),
                                      [disk.ivf_of(self.cpu_index).invlists, *(r.part_path for r in results if r.part_path)],
                                      work / IVFDATA_FILE)
            _remove_parts(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        disk.set_nprobe(merged, int(self.params["nprobe"]))
        disk.set_prefetch(merged, int(self.params.get("prefetch_threads", 0)))
        old_cleanup = self._cleanup
        # the same trained quantizer: a GPU copy of its centroids serves the grown index as well
        self._search_index = merged if self._search_index is self.cpu_index else self._search_index.on(merged)
        self.cpu_index = merged  # the old lists are unmapped with the old index
        self._ivfdata, self._rows, self._patch_ids = work / IVFDATA_FILE, None, None
        self._own_work(work)
        if old_cleanup is not None:
            old_cleanup()
        self._grown(n_rows, int(new.size))
        self.params["bytes_per_vector"] = round(ram_bytes(merged) / max(1, merged.ntotal), 1)
        return int(new.size)

    def _new_rows(self, source, modality, rows) -> tuple[np.ndarray, int]:
        """The valid store rows among `rows` (default: every row past `n_store_rows`), checked to be
        new to the index, and the store group's row count now."""
        from rsretrieve.store.read import selection_mask

        ds = self._source(source, modality)
        n_rows = int(ds.sizes["patch"])
        if rows is None:
            rows = np.arange(self.n_store_rows, n_rows)
        new = np.flatnonzero(selection_mask(ds, rows=np.asarray(rows, np.int64)))
        if new.size and new.min() < self.n_store_rows:
            raise ValueError(f"extend adds rows the index has not seen (>= {self.n_store_rows}); got row {new.min()}")
        return new, n_rows

    def _source(self, source, modality):
        from rsretrieve.retrieval.faiss_index import _open

        return _open(source if source is not None else self.store_path, modality or self.modality)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path, store_id: str | None = None) -> Path:
        if self._work is not None and self._work.exists():  # a build that took hours is not a killed one's leftover
            self._work.touch()
        return super().save(directory, store_id)

    def _write_data(self, staging: Path) -> None:
        """index.ivfdata moved (a build's, same file system) or copied into `staging`, then index.faiss
        naming it; the lists stay mapped from the same file."""
        target, lists = staging / IVFDATA_FILE, disk.ondisk_lists(self.cpu_index)
        if self._ivfdata is None or not self._ivfdata.exists() or self._ivfdata.stat().st_size != lists.totsize:
            raise StoreError(located(self._ivfdata or staging, f"the inverted lists this index maps ({lists.totsize} bytes) are gone or changed"))
        if self._work is not None and self._ivfdata.parent == self._work:
            shutil.move(str(self._ivfdata), target)
        else:
            shutil.copyfile(self._ivfdata, target)
        lists.filename = str(target)
        disk.write_index(self.cpu_index, staging / INDEX_FILE)

    def _saved_to(self, directory: Path) -> None:
        self._ivfdata = directory / IVFDATA_FILE
        if self._cleanup is not None:
            self._cleanup()
        self._own_work(None)

    @classmethod
    def from_saved(cls, directory: Path, meta: dict, store_path: str | Path | None, rebuild: str) -> "OnDiskIndex":
        """The index in `directory` (already checked against index.json), its lists mapped."""
        if store_path is None:
            raise StoreError(located(directory, f"an {disk.KIND} index re-ranks with the store's vectors: load it with store_path="))
        try:
            index = disk.load_ondisk(directory / INDEX_FILE)
        except RuntimeError as exc:
            raise StoreError(located(directory, f"unreadable index ({' '.join(str(exc).split())[:160]}); {rebuild}")) from None
        if disk.ondisk_lists(index) is None or index.ntotal != meta.get("ntotal"):
            raise StoreError(located(directory, f"index.faiss does not match index.json (ntotal {index.ntotal}); {rebuild}"))
        return cls(index, store_path, meta.get("modality") or directory.name, meta.get("params", {}), meta.get("provenance"),
                   meta.get("selection"), meta.get("n_store_rows"), directory / IVFDATA_FILE)


# -- what the index holds -------------------------------------------------------------------------


def all_ids(index) -> np.ndarray:
    """Every id in the inverted lists, sorted (for an ``ivfpq-disk`` index: the indexed store rows)."""
    import faiss

    ivf = disk.ivf_of(index)
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist) if lists.list_size(i)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def ram_bytes(index) -> int:
    """What searching keeps in memory: codes + ids of every vector (mapped from index.ivfdata into
    the page cache as lists are scanned), the coarse centroids (+ HNSW links) and PQ codebooks."""
    import faiss

    ivf = disk.ivf_of(index)
    quantizer = faiss.downcast_index(ivf.quantizer)
    total = ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + ivf.pq.centroids.size() * 4
    if isinstance(index, faiss.IndexPreTransform):  # the OPQ rotation: dim x dim floats
        total += sum(faiss.downcast_VectorTransform(index.chain.at(i)).A.size() * 4 for i in range(index.chain.size()))
    if hasattr(quantizer, "hnsw"):
        total += graph_bytes(quantizer.hnsw)
    return int(total)


def exact_topk(reader, rows: np.ndarray, queries: np.ndarray, k: int, batch_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of normalised queries over the store rows `rows`, streamed batch by batch."""
    best = rerank.TopK(queries, k)
    for start in range(0, rows.size, batch_size):
        ids = rows[start:start + batch_size]
        best.update(disk.read_vectors(reader, ids, ids.size), ids)
    return best.scores, best.rows


# -- tuning ----------------------------------------------------------------------------------------


def shortlist_recall(shortlist: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Recall@k after exact re-ranking of each query's shortlist: the share of the true top-k that
    the shortlist holds (re-ranking puts exactly those first; no vector needs to be read)."""
    hits = sum(len(set(t[t >= 0][:k].tolist()) & set(s[s >= 0].tolist())) for s, t in zip(shortlist, truth))
    total = sum(int((t[:k] >= 0).sum()) for t in truth)
    return hits / total if total else 1.0


def tune_search(index, queries: np.ndarray, truth: np.ndarray, k: int, goal: float) -> tuple[int, float, float]:
    """The smallest k_factor (store reads are the cost of a query), then the smallest nprobe, whose
    recall@k after re-ranking reaches `goal`; else the best setting tried. (nprobe, k_factor, recall)."""
    nlist = disk.ivf_of(index).nlist
    probes = [p for p in TUNING_PROBES if p <= nlist] or [nlist]
    widest = int(min(k * max(TUNING_FACTORS), disk.ivf_of(index).ntotal))
    shortlists = {}
    for nprobe in probes:
        disk.set_nprobe(index, nprobe)
        shortlists[nprobe] = index.search(np.ascontiguousarray(queries, np.float32), widest)[1]
    best = (probes[-1], TUNING_FACTORS[-1], -1.0)
    for factor in TUNING_FACTORS:
        for nprobe in probes:
            reached = shortlist_recall(shortlists[nprobe][:, :int(round(k * factor))], truth, k)
            if reached >= goal:
                return nprobe, factor, reached
            if reached > best[2]:
                best = (nprobe, factor, reached)
    return best


def tuning_queries(sample: np.ndarray, n_queries: int, seed: int) -> np.ndarray:
    """Proxy queries: sample vectors moved by noise the size of their distance to their nearest
    other sample vector (so that none is its own trivial top hit), normalised."""
    import faiss

    rng = np.random.default_rng(seed + 1)
    picked = sample[rng.choice(len(sample), size=min(n_queries, len(sample)), replace=False)]
    distances, _ = faiss.knn(picked, sample, 2)  # brute force over the sample, without copying it into an index
    spread = np.sqrt(np.maximum(distances[:, 1:2], 0))
    noise = rng.standard_normal(picked.shape).astype(np.float32) * spread / np.sqrt(picked.shape[1])
    return normalise_rows(picked + noise)


def sample_rows(selected: np.ndarray, size: int, seed: int) -> np.ndarray:
    if size >= selected.size:
        return selected
    return np.sort(np.random.default_rng(seed).choice(selected, size=size, replace=False))


def sequential_map(fn, tasks: list) -> list:
    """The in-process stand-in for a Dask client's map + gather."""
    return [fn(task) for task in tasks]


def slices_of(rows: np.ndarray, slice_rows: int) -> list[np.ndarray]:
    """The selected rows cut into runs of at most `slice_rows` rows (contiguous store ranges)."""
    rows = np.asarray(rows, np.int64)
    return [rows[i:i + slice_rows] for i in range(0, rows.size, max(1, slice_rows))]


def _work_dir(parent: str | Path, modality: str) -> Path:
    """A hidden folder for a build's trained index, parts and index.ivfdata, on the file system the
    index will be saved to (so that saving moves the big file instead of copying it). Beside an
    index folder `<modality>`, one a killed build left is removed an hour later (`remove_leftovers`)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{modality}.ivfpq-disk-", suffix=".partial", dir=parent))


def _add_parts(group_path: Path, work: Path, rows: np.ndarray, slice_rows: int, queries, batch_size: int, mapper,
               use_gpu: bool = True) -> list:
    tasks = [disk.SliceTask(str(group_path), str(work / "trained.faiss"), str(work / f"part-{i:05d}.faiss"), part, queries,
                            batch_size=min(batch_size, disk.ADD_BATCH), use_gpu=use_gpu)
             for i, part in enumerate(slices_of(rows, slice_rows))]
    if mapper is None:
        return sequential_map(disk.add_slice, tasks)
    return mapper(disk.add_slice, tasks)


ON_DISK["ivfpq-disk"] = OnDiskIndex


def _training_notice(problems: list[str]) -> str | None:
    """Why a build asked to train on the GPU (`use_gpu`) trained or assigned on the CPU (no GPU, or
    a GPU copy that failed: `problems`), or None if it did not."""
    from rsretrieve.retrieval.gpu import notice, why_no_gpu

    return notice(why_no_gpu() or (problems[0] if problems else None), "training")


def _remove_parts(work: Path) -> None:
    for path in [*work.glob("part-*.faiss"), work / "trained.faiss"]:
        path.unlink(missing_ok=True)
