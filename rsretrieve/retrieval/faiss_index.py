"""Per-modality FAISS indexes over an embedding store group, built by streaming the store.

Vectors are the store's embeddings (the model's retrieval vector: CSMoE's [CLS] token, CSMAE's
fc_norm of the mean patch token), L2-normalised in float32 batch by batch, so that inner
product = cosine similarity (the ranking CSMAE's retrieval.py uses: L2 on L2-normalised features,
which orders neighbours identically). `search` always returns cosine similarities, whatever the
index kind computes internally.

Index kinds (see docs/RETRIEVAL.md):

- ``flat``  : `IndexFlatIP`, exact. Default below ~1M vectors (`kind="auto"`).
- ``ivfpq`` : `IndexIVFPQ` (nlist ~ 4*sqrt(N), M sub-quantisers dividing the dim, 8 bits, L2 metric
  on the normalised vectors) wrapped in `IndexRefineFlat`, which re-ranks the PQ shortlist of
  k*k_factor candidates with exact distances. nprobe and k_factor are tuned after building so that
  recall@10 against exact search on a sample of the archive is >= `target_recall` (0.95).
  Training needs at least max(nlist, 2**nbits) vectors (256 with the default 8 bits; faiss's
  k-means wants one point per centroid, ideally 39): a smaller selection raises a one-line
  `StoreError` pointing to ``flat``, which is exact and the better choice at that size anyway.
- ``hnsw``  : `IndexHNSWFlat` (M=32, inner product), efSearch tuned the same way.
- ``ivfpq-disk`` : IVF-PQ whose codes live in a memory-mapped `index.ivfdata`, re-ranked exactly
  from the store (`ondisk_index.OnDiskIndex`); `auto` picks it from 1M vectors when the index is
  built from a store on disk. Grows with `extend`, as every kind does.

The store is never loaded whole: `ds.embedding` is read in slices of `batch_size` rows.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.provenance import describe, differences, is_random_init
from rsretrieve.io.files import file_record
from rsretrieve.retrieval.index_meta import (FORMAT_VERSION, IDS_FILE, INDEX_FILE, LOAD_CHECKSUM_MAX_BYTES, META_FILE, damage, files_of,
                                             json_default, read_meta, remove_leftovers, swap_in)
from rsretrieve.retrieval.ivfpq import (build_ivfpq, default_nlist, default_pq_m, full_storage, ivfpq_min_vectors,  # noqa: F401  (public here)
                                        memory_bytes, proxy_queries)
from rsretrieve.store.read import DEFAULT_BATCH, as_strings, coord_values, iter_embeddings, normalise_rows, open_group, provenance_of, selection_mask

AUTO_FLAT_MAX = 1_000_000
KINDS = ("flat", "ivfpq", "hnsw", "ivfpq-disk", "auto")
# kinds that keep their vectors in the store and re-rank from it, each registered by its own module
# (`ondisk_index`, imported by `rsretrieve.retrieval`): the base class never imports its subclasses
ON_DISK: dict[str, type] = {}


def _faiss():
    import faiss

    return faiss


# -- parameters ------------------------------------------------------------------------------------


def auto_kind(n: int, threshold: int = AUTO_FLAT_MAX, on_disk: bool = False) -> str:
    """Exact below `threshold` vectors; above, IVF-PQ: on disk with re-ranking from the store when
    the vectors are in a store on disk (`on_disk`), else in RAM with its refine vectors."""
    if n < threshold:
        return "flat"
    return "ivfpq-disk" if on_disk else "ivfpq"


# -- the index -------------------------------------------------------------------------------------


class EmbeddingIndex:
    """A FAISS index over (a selection of) one store group, with the map faiss id -> store row."""

    def __init__(self, index, rows: np.ndarray, patch_ids: np.ndarray, kind: str, params: dict,
                 provenance: dict | None = None, selection: dict | None = None, n_store_rows: int | None = None,
                 modality: str | None = None, use_gpu: bool = True):
        self.cpu_index = index
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)  # None: faiss ids are store rows (ivfpq-disk)
        self.patch_ids = None if patch_ids is None else as_strings(patch_ids)
        self.kind = kind
        self.params = dict(params)
        self.provenance = dict(provenance or {})
        self.selection = dict(selection or {})
        self.n_store_rows = int(n_store_rows if n_store_rows is not None else (self.rows.max() + 1 if rows is not None and len(rows) else 0))
        self.modality = modality
        self._search_index, self.gpu_notice = index, None  # the notice: why --gpu-search searches on the CPU
        if use_gpu:
            self._on_gpu()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, source, modality: str | None = None, *, kind: str = "auto", rows=None,
              split: str | Sequence[str] | None = None, pair_ids: Sequence[str] | None = None,
              batch_size: int = DEFAULT_BATCH, use_gpu: bool = True, seed: int = 0,
              target_recall: float = 0.95, tune: bool = True, store_path: str | Path | None = None, mapper=None,
              work_dir: str | Path | None = None, auto_threshold: int = AUTO_FLAT_MAX, **params) -> "EmbeddingIndex":
        """Build from a store group. `source` is an opened `xr.Dataset` (one group) or a store path
        (then `modality` names the group). `rows` (bool mask or row indices), `split` and
        `pair_ids` select what to index. `params` override defaults: nlist, m, nbits, nprobe,
        k_factor, refine ("flat" | "none"), train_size, hnsw_m, ef_construction, ef_search.
        ``ivfpq-disk`` re-ranks from the store at `store_path` (default: `source`'s) and takes
        `mapper(fn, tasks)` (a Dask map: `rsretrieve.indexer.index_build`) and `work_dir`; `auto`
        is exact below `auto_threshold` vectors."""
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
        ds = _open(source, modality)
        mask = selection_mask(ds, rows=rows, split=split, pair_ids=pair_ids)
        selected = np.flatnonzero(mask)
        n = int(selected.size)
        if n == 0:
            raise StoreError(f"no embeddings to index in the {modality or 'store'} group (selection is empty)")
        dim = int(ds.sizes["dim"])
        store = _store_path_of(source, ds, modality, store_path)
        if kind == "auto":
            kind = auto_kind(n, auto_threshold, on_disk=store is not None)
        selection = {
            "split": split if split is None or isinstance(split, str) else list(split),
            "rows": None if rows is None else "explicit",
            "pair_ids": None if pair_ids is None else len(list(pair_ids)),
            "n_selected": n,
        }
        if kind in ON_DISK:
            if store is None:
                raise ValueError(f"kind {kind!r} re-ranks from a store on disk: build it from a store path, or pass store_path=")
            return ON_DISK[kind].build_from(ds, modality or ds.attrs["modality"], selected, store, seed=seed, tune=tune,
                                          target_recall=target_recall, batch_size=batch_size, mapper=mapper, work_dir=work_dir,
                                          use_gpu=use_gpu, selection=selection, **params)
        faiss = _faiss()
        if kind == "flat":
            index, chosen = faiss.IndexFlatIP(dim), {"metric": "ip"}
        elif kind == "hnsw":
            hnsw_m = int(params.get("hnsw_m", 32))
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(params.get("ef_construction", 80))
            chosen = {"metric": "ip", "hnsw_m": hnsw_m, "ef_construction": index.hnsw.efConstruction,
                      "ef_search": int(params.get("ef_search", 64))}
            index.hnsw.efSearch = chosen["ef_search"]
        else:  # ivfpq
            index, chosen = build_ivfpq(ds, selected, dim, n, batch_size, seed, params)
        rows_parts = []
        for batch_rows, vectors in iter_embeddings(ds, mask, batch_size):
            index.add(vectors)
            rows_parts.append(batch_rows)
        all_rows = np.concatenate(rows_parts)
        pids = coord_values(ds, "patch_id")
        patch_ids = as_strings(pids[all_rows]) if pids is not None else as_strings(all_rows)
        chosen["bytes_per_vector"] = round(memory_bytes(index, kind) / max(1, index.ntotal), 1)
        out = cls(index, all_rows, patch_ids, kind, chosen, provenance_of(ds), selection,
                  n_store_rows=int(ds.sizes["patch"]), modality=modality or ds.attrs.get("modality"), use_gpu=False)
        if tune and kind in ("ivfpq", "hnsw") and not _explicit_search_params(kind, params):
            out.tune(target_recall=target_recall, seed=seed)
        if use_gpu:
            out._on_gpu()
        return out

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, patch_ids: Sequence[str] | None = None, *, kind: str = "flat",
                     provenance: dict | None = None, **kwargs) -> "EmbeddingIndex":
        """Convenience for in-memory arrays (tests, benchmarks): wraps them as a one-group dataset."""
        import xarray as xr

        vectors = np.asarray(vectors)
        n = vectors.shape[0]
        coords = {"patch_id": ("patch", np.asarray(patch_ids if patch_ids is not None else [str(i) for i in range(n)], dtype=object))}
        ds = xr.Dataset({"embedding": (("patch", "dim"), vectors)}, coords=coords)
        ds.attrs["provenance"] = dict(provenance or {})
        return cls.build(ds, kind=kind, **kwargs)

    def _on_gpu(self) -> None:
        """Search through the GPU form of the index (`retrieval.gpu`), or the CPU one and say why."""
        from rsretrieve.retrieval.gpu import to_gpu

        self._search_index, self.gpu_notice = to_gpu(self.cpu_index, self.kind)

    # -- search ------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities (Q, k) and store rows (Q, k), best first. Rows are -1 where an
        approximate index found fewer than k candidates. A k larger than the index is clamped to
        its size (the arrays are then (Q, ntotal)): an archive returns what it holds."""
        q, k = self._normalised_queries(queries, k)
        scores, ids = self._search_index.search(q, k)
        rows = np.where(ids >= 0, self.rows[np.clip(ids, 0, None)], -1)
        if self.params.get("metric") == "l2":  # squared L2 between unit vectors -> cosine
            scores = 1.0 - scores / 2.0
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, rows

    def _normalised_queries(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        """((Q, dim) queries, L2-normalised, after checking their shape; k clamped to the index's size)."""
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self.ntotal < 1:
            raise StoreError("the index holds no vectors")
        return normalise_rows(queries), min(k, self.ntotal)

    def search_patch_ids(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like `search`, with patch ids (str, '' where missing) instead of store rows."""
        scores, rows = self.search(queries, k)
        lookup = dict(zip(self.rows.tolist(), self.patch_ids.tolist()))
        ids = np.array([[lookup.get(int(r), "") for r in line] for line in rows], dtype=object)
        return scores, ids

    # -- approximate-search parameters ---------------------------------------------------------------
    def set_search_params(self, **params) -> None:
        """nprobe / k_factor (ivfpq), ef_search (hnsw)."""
        faiss = _faiss()
        idx = self.cpu_index
        if self.kind == "ivfpq":
            base = faiss.downcast_index(idx.base_index) if hasattr(idx, "base_index") else idx
            if "nprobe" in params:
                base.nprobe = int(params["nprobe"])
                self.params["nprobe"] = int(params["nprobe"])
            if "k_factor" in params and hasattr(idx, "k_factor"):
                idx.k_factor = float(params["k_factor"])
                self.params["k_factor"] = float(params["k_factor"])
        elif self.kind == "hnsw" and "ef_search" in params:
            idx.hnsw.efSearch = int(params["ef_search"])
            self.params["ef_search"] = int(params["ef_search"])
        if self._search_index is not idx:  # a GPU copy: rebuild it with the new parameters
            self._on_gpu()

    def exact_search(self, normalised_queries: np.ndarray, k: int) -> np.ndarray:
        """Exact neighbours (faiss ids) from the full vectors the index keeps (flat storage of
        IndexRefineFlat / IndexHNSWFlat / IndexFlat)."""
        storage = full_storage(self.cpu_index, self.kind)
        if storage is None:
            raise ValueError("this index keeps no full vectors; exact search needs the store")
        _, ids = storage.search(np.ascontiguousarray(normalised_queries, dtype=np.float32), k)
        return ids

    def tune(self, target_recall: float = 0.95, k: int = 10, n_queries: int = 500, seed: int = 0,
             margin: float = 0.02) -> float:
        """Pick the cheapest search parameters whose recall@k against exact search reaches
        `target_recall + margin` on queries drawn from the archive itself, each perturbed by noise
        of the size of its distance to its nearest neighbour (so it is not its own trivial top hit).
        These proxy queries are a little easier than unseen ones, hence the margin. Returns the
        recall reached (recorded in `params["tuned_recall"]`)."""
        goal = min(target_recall + margin, 0.999)
        if self.kind not in ("ivfpq", "hnsw"):
            return 1.0
        k = min(k, self.ntotal)
        queries = proxy_queries(self.cpu_index, self.kind, n_queries, seed)
        truth = self.exact_search(queries, k)
        if self.kind == "hnsw":
            grid = [{"ef_search": ef} for ef in (32, 48, 64, 96, 128, 192, 256, 384, 512, 768)]
        else:
            nlist = int(self.params["nlist"])
            probes = [p for p in (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p <= nlist] or [nlist]
            factors = (1.0,) if self.params.get("refine") == "none" else (2.0, 4.0, 8.0, 16.0)
            grid = [{"nprobe": p, "k_factor": f} for p in probes for f in factors]
        reached = 0.0
        for setting in grid:
            self.set_search_params(**setting)
            _, ids = self.cpu_index.search(queries, k)
            reached = recall_at_k(ids, truth)
            if reached >= goal:
                break
        self.params["tuned_recall"] = round(float(reached), 4)
        self.params["target_recall"] = target_recall
        return reached

    # -- growing ---------------------------------------------------------------------------------------
    def extend(self, source, modality: str | None = None, rows=None, *, batch_size: int = DEFAULT_BATCH, **_) -> int:
        """Add the valid store rows `rows` (default: every row past `n_store_rows`, i.e. what a grown
        store gained; rows already indexed are refused) with `index.add`, trained parts unchanged.
        Returns the number added."""
        ds = _open(source, modality or self.modality)
        n_rows = int(ds.sizes["patch"])
        wanted = np.arange(self.n_store_rows, n_rows) if rows is None else np.asarray(rows, np.int64)
        mask = selection_mask(ds, rows=wanted)
        if np.isin(np.flatnonzero(mask), self.rows).any():
            raise ValueError("extend adds rows the index has not seen; some of these are in it already")
        added = [np.zeros(0, np.int64)]
        for batch_rows, vectors in iter_embeddings(ds, mask, batch_size):
            self.cpu_index.add(vectors)
            added.append(batch_rows)
        added = np.concatenate(added)
        pids = coord_values(ds, "patch_id")
        self.rows = np.concatenate([self.rows, added])
        self.patch_ids = np.concatenate([self.patch_ids, as_strings(pids[added]) if pids is not None else as_strings(added)])
        self._grown(n_rows, int(added.size))
        self.params["bytes_per_vector"] = round(memory_bytes(self.cpu_index, self.kind) / max(1, self.ntotal), 1)
        if self._search_index is not self.cpu_index:
            self._on_gpu()
        return int(added.size)

    def _grown(self, n_store_rows: int, added: int) -> None:
        self.n_store_rows = int(n_store_rows)
        self.selection["n_selected"] = int(self.selection.get("n_selected") or 0) + added

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path, store_id: str | None = None) -> Path:
        """Write index.faiss, ids.parquet (faiss id -> store row, patch_id) and index.json (with the
        files' sizes and SHA-256, and the id of the store the index belongs to); an ``ivfpq-disk``
        index writes index.faiss and index.ivfdata instead of the first two.

        The files are written to a folder beside `directory` and swapped in by renames, so a crash
        or a full disk leaves the previous index (or none), never a mix of two."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(directory)
        staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.partial")
        staging.mkdir()
        try:
            self._write_data(staging)
            meta = {
                "format_version": FORMAT_VERSION,
                "store_id": store_id,
                "modality": self.modality,
                "kind": self.kind,
                "params": self.params,
                "ntotal": self.ntotal,
                "dim": self.dim,
                "n_store_rows": self.n_store_rows,
                "selection": self.selection,
                "provenance": self.provenance,
                "random_init": is_random_init(self.provenance),
                "files": {name: file_record(staging / name) for name in files_of(self.kind)},
            }
            (staging / META_FILE).write_text(json.dumps(meta, indent=2, default=json_default))
            swap_in(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._saved_to(directory)
        return directory

    def _write_data(self, staging: Path) -> None:
        """index.faiss and ids.parquet (faiss id -> store row, patch id) into `staging`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        _faiss().write_index(self.cpu_index, str(staging / INDEX_FILE))
        pq.write_table(pa.table({"row": pa.array(self.rows, pa.int64()), "patch_id": pa.array(self.patch_ids.tolist(), pa.string())}),
                       staging / IDS_FILE)

    def _saved_to(self, directory: Path) -> None:
        """Called once the files are in place (an on-disk index now maps them from there)."""

    @classmethod
    def load(cls, directory: str | Path, expected_provenance: dict | None = None, use_gpu: bool = True,
             store_id: str | None = None, store_path: str | Path | None = None) -> "EmbeddingIndex":
        """Read an index written by `save`, after checking its files against their sizes (and
        SHA-256, up to `LOAD_CHECKSUM_MAX_BYTES` a file). With `expected_provenance` (the store's)
        and `store_id`, an index built from other embeddings or for another store is refused; every
        refusal is a one-line StoreError. An ``ivfpq-disk`` index needs `store_path` (the store it
        re-ranks from); its lists are memory-mapped, not read."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        faiss = _faiss()
        directory = Path(directory)
        meta = read_meta(directory)
        modality = meta.get("modality") or directory.name
        rebuild = f"run `rsretrieve index --modality {modality}` to rebuild it"
        if store_id is not None and meta.get("store_id") != store_id:
            raise StoreError(located(directory, f"index belongs to another store (id {meta.get('store_id')}, not {store_id}); {rebuild}"))
        if expected_provenance is not None:
            diff = differences(meta.get("provenance"), expected_provenance)
            if diff:
                raise StoreError(located(
                    directory,
                    f"index was built from embeddings of {describe(meta.get('provenance'))}, but the store holds "
                    f"{describe(expected_provenance)} (differs in {', '.join(diff)}); {rebuild}",
                ))
        problem = damage(directory, meta, checksums=LOAD_CHECKSUM_MAX_BYTES)
        if problem:
            raise StoreError(located(directory, f"damaged index: {problem}; {rebuild}"))
        if meta.get("kind") in ON_DISK:
            ondisk = ON_DISK[meta["kind"]].from_saved(directory, meta, store_path, rebuild)
            if use_gpu:
                ondisk._on_gpu()  # its coarse quantizer on the GPU (a search-only copy: never saved), or the notice says why not
            return ondisk
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
            ids = pq.read_table(directory / IDS_FILE)
            rows = ids["row"].to_numpy()
        except (RuntimeError, OSError, KeyError, pa.ArrowException) as exc:
            raise StoreError(located(directory, f"unreadable index ({' '.join(str(exc).split())[:160]}); {rebuild}")) from None
        if rows.size != index.ntotal:
            raise StoreError(located(directory, f"index holds {index.ntotal} vectors but its id map {rows.size}; {rebuild}"))
        return cls(index, rows, np.asarray(ids["patch_id"].to_pylist(), dtype=object), meta["kind"], meta.get("params", {}),
                   meta.get("provenance"), meta.get("selection"), meta.get("n_store_rows"), meta.get("modality"), use_gpu=use_gpu)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, ntotal={self.ntotal}, dim={self.dim}, params={self.params})"


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_i ∩ truth_i| / |truth_i| (ids < 0 ignored)."""
    found, truth = np.asarray(found), np.asarray(truth)
    hits = 0
    total = 0
    for f, t in zip(found, truth):
        t_set = set(t[t >= 0].tolist())
        hits += len(t_set.intersection(f[f >= 0].tolist()))
        total += len(t_set)
    return hits / total if total else 1.0


# -- helpers ---------------------------------------------------------------------------------------


def _open(source, modality: str | None):
    if hasattr(source, "variables") and "embedding" in getattr(source, "variables", {}):
        return source
    if modality is None:
        raise ValueError("building from a store path needs the modality (group) to read")
    path = Path(source)
    if not (path / modality).exists():
        raise StoreError(located(path, f"has no {modality} group"))
    ds = open_group(path, modality)
    ds.attrs.setdefault("modality", modality)
    return ds


def _store_path_of(source, ds, modality: str | None, given) -> Path | None:
    """The store on disk the group comes from (a path given, or the one xarray opened), if its
    group is there: an ivfpq-disk index reads vectors from it at search time."""
    path = given if given is not None else (source if isinstance(source, (str, Path)) else ds.encoding.get("source"))
    group = modality or ds.attrs.get("modality")
    if path is None or group is None or not (Path(path) / group / "embedding").exists():
        return None
    return Path(path)


def _explicit_search_params(kind: str, params: dict) -> bool:
    if kind == "hnsw":
        return "ef_search" in params
    return "nprobe" in params and ("k_factor" in params or params.get("refine") == "none")
