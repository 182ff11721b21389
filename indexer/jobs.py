"""Jobs that combine the encoder stage with the library: encode what is missing, then index.

These are what `rsretrieve index` and `rsretrieve eval` run; a notebook can call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, EncodeSummary, cluster, encode
from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.io.locks import exclusive
from rsretrieve.retrieval.faiss_index import EmbeddingIndex
from rsretrieve.retrieval.index_meta import index_is_current, read_meta
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
    windows: str | None = None  # Major TOM: "majortom" (its fragmenter, the default) or "grid" (the paper's 8 x 8)
    compile: bool = False  # torch.compile the model on the encoder workers
    readers: int | None = None  # reader processes of the local cluster (default: one per core)
    dashboard: str | None = None  # address of the local cluster's Dask dashboard (None: no dashboard)

    @property
    def store_path(self) -> Path:
        if self.store:
            return Path(self.store)
        path = self.workspace.selection_store(self.selection)
        # another cut of the tiles is another set of patches: a store of its own
        return path.with_name(f"{path.stem}-{self.windows}windows.zarr") if self.windows == "grid" else path

    @property
    def dataset_spec(self) -> DatasetSpec:
        options = (("windows", self.windows),) if self.windows else ()
        return DatasetSpec(self.selection.dataset, self.selection.root, self.selection.subset, options)

    @property
    def encoder_spec(self) -> EncoderSpec:
        return EncoderSpec(self.selection.model_spec, self.device, self.batch_size, self.selection.config, compile=self.compile)


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
        **options,
    )


@dataclass
class IndexOutcome:
    path: Path
    built: bool
    kind: str
    vectors: int


def ensure_index(job: Job, modality: Modality, kind: str = "auto", use_gpu: bool = False, on_wait=None) -> IndexOutcome:
    """Build the modality's index from the store unless an intact index of this store is current.

    Checking is read-only; building holds the store's lock (a second `index` waits, then finds the
    index current) and refuses a store whose data disagrees with its ledger (`rsretrieve verify`)."""
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
        index = EmbeddingIndex.build(store.open(modality), modality, kind=kind, use_gpu=use_gpu)
        index.save(directory, store_id=store.store_id)
    return IndexOutcome(directory, True, index.kind, index.ntotal)


def _current_index(store: EmbeddingStore, modality: Modality, directory: Path, kind: str) -> IndexOutcome | None:
    """The outcome of an index that is current for this store (intact, built from this store's
    embeddings, all of them (a resumed encode adds rows), of the kind asked for), else None."""
    group = store.open(modality)
    n_valid = int(group["valid"].sum())
    if not index_is_current(directory, store.provenance(modality), group.sizes["patch"], selection={"n_selected": n_valid},
                            store_id=store.store_id):
        return None
    meta = read_meta(directory)  # its kind and size, without loading the index itself
    return IndexOutcome(directory, False, meta["kind"], int(meta["ntotal"])) if kind in ("auto", meta["kind"]) else None


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
