"""Jobs that combine the encoder stage with the library: encode what is missing, then index.

These are what `rsretrieve index` and `rsretrieve eval` run; a notebook can call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.indexer.pipeline import MAX_FAILED_SHARE, DatasetSpec, EncoderSpec, EncodeSummary, cluster, encode
from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.io.locks import exclusive
from rsretrieve.retrieval.faiss_index import EmbeddingIndex, auto_kind
from rsretrieve.retrieval.index_meta import growable_meta, index_is_current, read_meta
from rsretrieve.store import EmbeddingStore
from rsretrieve.store.integrity import damaged_chunks
from rsretrieve.workspace import Selection, Workspace


@dataclass(frozen=True)
class Job:
    """Everything a job needs, resolved from the command line and the workspace."""

    workspace: Workspace
    selection: Selection
    store: Path | None = None  # explicit store path; default: one per dataset, subset and model
    device: str = "auto"
    batch_size: int | None = None
    scheduler: str | None = None
    dtype: str | None = None  # float32/float16 for a new store; None: an existing store's
    compile: bool = False  # torch.compile the model on the encoder workers
    readers: int | None = None  # reader processes of the local cluster (default: one per core)
    dashboard: str | None = None  # address of the local cluster's Dask dashboard (None: no dashboard)
    max_skipped: float = MAX_FAILED_SHARE  # share of the selection that may be unreadable (a known-incomplete download)
    precision: str = "auto"  # compute precision: float32 | bfloat16 | float16; auto: the encoder workers' (or the store's)

    @property
    def store_path(self) -> Path:
        """--store, else the selection's own (dataset, subset, model, Major TOM windows and filters)."""
        return Path(self.store) if self.store else self.workspace.selection_store(self.selection)

    @property
    def dataset_spec(self) -> DatasetSpec:
        return DatasetSpec(self.selection.dataset, self.selection.root, self.selection.subset, self.selection.reader_options)

    @property
    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec(self.selection.model_spec, self.device, self.batch_size, self.selection.config,
                           precision=self.precision, compile=self.compile)


def job_cluster(job: Job, on_connect=None) -> cluster:
    """One Dask client for all of a job's encoding: `with job_cluster(job) as client: ...`;
    `on_connect(client)` runs once it is up."""
    return cluster(None, job.scheduler, job.device, job.readers, small_model=is_small_model(job.selection.model_spec, job.selection.config),
                   dashboard=job.dashboard, on_connect=on_connect)


def is_small_model(spec: str, config: str | None = None) -> bool:
    """Whether a registered config (or the one a checkpoint names) is cheap next to reading; a
    checkpoint of unknown size counts as large, as every published model is."""
    from rsretrieve.indexer.cluster import SMALL_MODEL, model_cost
    from rsretrieve.models.registry import REGISTRY

    name = config or (spec if spec in REGISTRY and not Path(spec).exists() else None)
    return name in REGISTRY and model_cost(REGISTRY[name]) < SMALL_MODEL


def ensure_embeddings(job: Job, modality: Modality, client=None, **options) -> EncodeSummary:
    """Encode the patches of `modality` that the store lacks or holds damaged (nothing, if it is
    complete and intact). `options`: progress callbacks, `on_wait`, `retry_skipped` (`encode`)."""
    return encode(
        job.dataset_spec,
        modality,
        job.store_path,
        job.encoder_spec,
        client=client,
        scheduler=job.scheduler,
        dtype=job.dtype,
        max_failed_share=job.max_skipped,
        **options,
    )


@dataclass
class IndexOutcome:
    path: Path
    built: bool
    kind: str
    vectors: int
    params: dict = field(default_factory=dict)  # as in index.json: nlist, m, bytes_per_vector, ...
    added: int | None = None  # vectors added to the existing index of a grown store (None: built whole)
    gpu_notice: str | None = None  # with use_gpu: why the work ran on the CPU (`retrieval.gpu`), shown as query shows it

    @property
    def bytes_per_vector(self) -> float | None:
        return self.params.get("bytes_per_vector")

    def summary(self) -> str:
        """"ivfpq-disk (nlist 16384, PQ64, re-rank from the store), 72 B/vector in RAM"."""
        p = self.params
        how = {"flat": "exact", "hnsw": f"HNSW{p.get('hnsw_m', '')}, efSearch {p.get('ef_search', '')}"}.get(self.kind)
        if how is None:  # the IVF-PQ kinds
            rerank = "re-rank from the store" if self.kind == "ivfpq-disk" else ("re-rank in RAM" if p.get("refine") == "flat" else "no re-rank")
            how = f"nlist {p.get('nlist')}, {'OPQ+' if p.get('opq') else ''}PQ{p.get('m')}, nprobe {p.get('nprobe')}, {rerank}"
        memory = f", {p['bytes_per_vector']:,.0f} B/vector in RAM" if p.get("bytes_per_vector") is not None else ""
        return f"{self.kind} ({how}){memory}"


def ensure_index(job: Job, modality: Modality, kind: str = "auto", use_gpu: bool = False, on_wait=None, client=None) -> IndexOutcome:
    """Build the modality's index from the store unless an intact index of this store is current;
    an intact index of a store that has since gained rows gets those rows added (`grow_index`).

    Checking is read-only; building holds the store's lock (a second `index` waits, then finds the
    index current) and refuses a store whose data disagrees with its ledger (`rsretrieve verify`).
    `client`: a Dask client or `cluster` (started only if used) on which an ``ivfpq-disk`` index
    adds its parts; without one they are added in this process. With `use_gpu`, `gpu_notice` says
    why what was built or added ran on the CPU (an index already current needs no work, hence none)."""
    store = EmbeddingStore(job.store_path)
    directory = job.workspace.index_dir(job.store_path, modality)
    current = _current_index(store, modality, directory, kind)
    if current:
        return current
    with exclusive(store.path, on_wait):
        current = _current_index(store, modality, directory, kind)  # another process may have built it meanwhile
        if current:
            return current
        damaged = damaged_chunks(store, modality)
        if damaged:
            key, why = next(iter(damaged.items()))
            raise StoreError(located(store.path, f"{len(damaged)} {modality.upper()} chunk(s) disagree with the ledger (first: {key}: {why}); "
                                                 f"run `rsretrieve encode --modality {modality}` to encode them again"))
        mapper = _lazy_mapper(client)
        grown = grow_index(store, modality, directory, kind, mapper)
        if grown:
            grown.gpu_notice = _adding_notice(grown.kind) if use_gpu else None
            return grown
        index = EmbeddingIndex.build(store.open(modality, index=False), modality, kind=kind, use_gpu=use_gpu, store_path=store.path,
                                     mapper=mapper, work_dir=directory.parent)
        index.save(directory, store_id=store.store_id)
    return IndexOutcome(directory, True, index.kind, index.ntotal, dict(index.params), gpu_notice=index.gpu_notice if use_gpu else None)


def _adding_notice(kind: str) -> str | None:
    """Why the rows a grown ``ivfpq-disk`` index gained were assigned to lists on the CPU (the
    in-RAM kinds add on the CPU in any case: their GPU form is for searching)."""
    from rsretrieve.retrieval.gpu import notice, why_no_gpu

    return notice(why_no_gpu(), "adding") if kind == "ivfpq-disk" else None


def grow_index(store: EmbeddingStore, modality: Modality, directory: Path, kind: str = "auto", mapper=None) -> IndexOutcome | None:
    """Add to the saved index the rows the store gained since it was built, if the index is intact,
    of this store and these embeddings, over the whole archive, holds exactly as many vectors as
    there are valid rows below its `n_store_rows` (nothing changed there), and is of the kind asked
    (for `auto`: the kind auto would pick now). None when it must be rebuilt instead."""
    provenance = store.provenance(modality)
    meta = growable_meta(directory, provenance, store.store_id)
    if meta is None:
        return None
    old = int(meta["n_store_rows"])
    valid = np.asarray(store.zarr_group(modality)["valid"][:], dtype=bool)
    wanted = auto_kind(int(valid.sum()), on_disk=True) if kind == "auto" else kind
    if valid.size <= old or meta["kind"] != wanted:
        return None
    if int(valid[:old].sum()) != int(meta["ntotal"]) or int((meta.get("selection") or {}).get("n_selected", -1)) != int(meta["ntotal"]):
        return None
    index = EmbeddingIndex.load(directory, expected_provenance=provenance, use_gpu=False, store_id=store.store_id,
                                store_path=store.path)
    added = index.extend(store.open(modality, index=False), modality, np.arange(old, valid.size), mapper=mapper, work_dir=directory.parent)
    index.save(directory, store_id=store.store_id)
    return IndexOutcome(directory, True, index.kind, index.ntotal, dict(index.params), added=added)


def _lazy_mapper(client):
    """A Dask mapper over `client` (a Client or a `cluster`, started on first use), or None."""
    if client is None:
        return None

    def run(fn, tasks):
        from rsretrieve.indexer.index_build import dask_mapper

        return dask_mapper(client.get() if hasattr(client, "get") and not hasattr(client, "submit") else client)(fn, tasks)

    return run


def _current_index(store: EmbeddingStore, modality: Modality, directory: Path, kind: str) -> IndexOutcome | None:
    """The outcome of an index that is current for this store (intact, built from this store's
    embeddings, all of them (a resumed encode adds rows), of the kind asked for), else None."""
    n_rows = int(store.zarr_group(modality)["valid"].shape[0])
    if not index_is_current(directory, store.provenance(modality), n_rows, selection={"n_selected": store.valid_count(modality)},
                            store_id=store.store_id):
        return None
    meta = read_meta(directory)  # its kind and size, without loading the index itself
    return IndexOutcome(directory, False, meta["kind"], int(meta["ntotal"]), meta.get("params") or {}) if kind in ("auto", meta["kind"]) else None


def needed_modalities(tasks) -> list[Modality]:
    """Modalities a set of tasks touches: s1s2 needs both."""
    return sorted({t[:2] for t in tasks} | {t[2:] for t in tasks})


def evaluate_subset(job: Job, subset_name: str, tasks: tuple[str, ...], k: int | None = None):
    """Score the store's embeddings with the paper's protocol (run `ensure_embeddings` first).

    Queries and archive are restricted to the named subset's pairs, snowy and cloudy patches
    excluded as in the paper, even where the store holds more (the bundled sample keeps all 24)."""
    from rsretrieve.datasets import open_dataset
    from rsretrieve.retrieval.evaluate import evaluate
    from rsretrieve.datasets.subsets import get_subset

    subset = get_subset(subset_name)
    root = job.selection.root or None  # a folder or a URL: open_dataset tells them apart
    dataset = open_dataset(job.selection.dataset, root, subset.name if job.selection.dataset != "sample" else None, include_snow_cloud=False)
    pair_ids = dataset.pairs()["patch_id"].to_pylist()
    return evaluate(job.store_path, tasks=tasks, k=k or subset.default_k, pair_ids=pair_ids, use_gpu=False)
