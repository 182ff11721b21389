"""The encoder stage: data chunks -> CSMoE [CLS] embeddings -> Zarr store, over a Dask cluster.

Each data chunk becomes two tasks: `read` (GeoTIFF/LMDB/parquet decoding to raw values, runs on
any worker thread) and `encode` (one batch through the model). Encode tasks claim the worker's single
`encoder` resource, so a worker runs one encode at a time on its CPU cores or GPU while its other
threads read the next chunks: reading overlaps encoding. Each worker process loads the model once.

The driver writes each finished chunk into its region of the store and only then marks it done, so
an interrupted run resumes where it stopped and a finished run does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.datasets import Chunk, PatchBatch, open_dataset
from rsretrieve.models.inference import embed_raw
from rsretrieve.errors import RSRetrieveError
from rsretrieve.provenance import MODEL_KEYS, describe, differences
from rsretrieve.store import ChunkSpan, EmbeddingStore

ENCODER_RESOURCE = "encoder"
MAX_FAILED_SHARE = 0.05  # unreadable inputs tolerated before a run fails (nodata windows are not failures)
DATA_GAP = "invalid pixel(s)"  # a window with nodata: the data has a gap, nothing is broken


def skip_reason(message: str) -> str:
    """The kind of problem in a one-line skip message ('<where>: <problem>'): the problem without
    its window, its closing details in parentheses and its numbers ('missing band file',
    'unreadable GeoTIFF', 'invalid pixel(s)')."""
    problem = message.split(": ", 1)[-1]
    problem = re.sub(r"^window [\d,]+: ", "", problem)
    problem = re.sub(r"\s*\([^()]*(\([^()]*\)[^()]*)*\)$", "", problem)
    return re.sub(r"\b\d+\b\s*", "", problem).strip()


def skip_counts(skipped: list[tuple[str, str]]) -> Counter:
    return Counter(skip_reason(message) for _, message in skipped)


@dataclass(frozen=True)
class DatasetSpec:
    """How a worker opens the dataset: picklable, reopened once per process."""

    name: str
    root: str | None = None
    subset: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # reader options, e.g. (("chunk_size", 64),)

    def open(self):
        key = (self.name, self.root, self.subset, self.options)
        with _CACHE_LOCK:
            if key not in _DATASETS:
                _DATASETS[key] = open_dataset(self.name, Path(self.root) if self.root else None, self.subset, **dict(self.options))
            return _DATASETS[key]

    def to_dict(self) -> dict:
        return {"name": self.name, "root": self.root, "subset": self.subset, "options": dict(self.options)}


@dataclass(frozen=True)
class EncoderSpec:
    """Which model to run where: a config name or checkpoint path (with, for plain weights, the
    registered config they fit), a device, a batch size."""

    model: str = "csmoe-p16"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # default: 32 on CPU, 256 on a GPU
    config: str | None = None

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RSRetrieveError("--device cuda: no CUDA device is available on this machine")
        return self.device

    def resolved_batch_size(self) -> int:
        return self.batch_size or (256 if self.resolved_device().startswith("cuda") else 32)


@dataclass
class EncodeSummary:
    modality: Modality
    store: Path
    chunks_total: int
    chunks_already_done: int
    chunks_encoded: int = 0
    patches_encoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. a subset count that differs from the paper's
    patches_total: int = 0

    def skip_summary(self, examples: int = 3) -> str:
        """'3 skipped: 2 missing band file, 1 invalid pixel(s) ...; first: <path>, ...' (one line)."""
        counts = skip_counts(self.skipped)
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
        first = "; ".join(message for _, message in self.skipped[:examples])
        return f"{len(self.skipped)} skipped: {reasons}; first: {first}"

    @property
    def patches_per_second(self) -> float:
        return self.patches_encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.chunks_already_done == self.chunks_total


class TooManySkipped(RSRetrieveError):
    """Every patch of a modality, or more than the allowed share of them, could not be read. What
    was encoded stays in the store; the message says what was skipped and why."""

    def __init__(self, message: str, summary: EncodeSummary):
        super().__init__(message)
        self.summary = summary


class EncodeInterrupted(RSRetrieveError):
    """The run stopped (a task failed, or Ctrl-C); what was written stays valid and resumable."""

    def __init__(self, message: str, summary: EncodeSummary):
        super().__init__(message)
        self.summary = summary


# -- worker side --------------------------------------------------------------------------------
_CACHE_LOCK = threading.Lock()
_DATASETS: dict = {}
_MODELS: dict = {}


def _worker_model(spec: EncoderSpec, device: str):
    """The process's one copy of the model, loaded on first use."""
    from rsretrieve.models.checkpoint import load_model

    path = Path(spec.model)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None
    key = (spec.model, spec.config, device, stamp)
    with _CACHE_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per worker process
            if device == "cpu":
                _use_worker_cores()
            with warnings.catch_warnings():
                # random-init is stamped in the store's provenance and said by the client, once
                warnings.simplefilter("ignore", UserWarning)
                logging.getLogger("rsretrieve").setLevel(logging.ERROR)
                _MODELS[key] = load_model(spec.model, device=device, config=spec.config)
        return _MODELS[key]


def _use_worker_cores() -> None:
    """dask's nanny starts workers with OMP_NUM_THREADS=1, which would leave torch on one core:
    the encoder is the worker's main job, so it gets as many threads as the worker has."""
    import torch

    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except ValueError:  # not inside a dask worker
        threads = os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))


def _worker_device(spec: EncoderSpec) -> str:
    device = spec.resolved_device()
    if device != "cuda":
        return device
    import torch

    try:  # one GPU per worker: LocalCluster names its workers 0, 1, ...
        from distributed import get_worker

        return f"cuda:{int(get_worker().name) % torch.cuda.device_count()}"
    except (ValueError, TypeError):
        return "cuda"


def read_chunk(dataset: DatasetSpec, chunk: Chunk) -> PatchBatch:
    return dataset.open().read_chunk(chunk)


def encode_batch(batch: PatchBatch, spec: EncoderSpec, chunk_hook: Callable | None = None, chunk: Chunk | None = None) -> tuple[list[str], np.ndarray, list, dict]:
    """Embed one chunk's pixels. Returns (patch_ids, embeddings float32 (n, D), skipped, the
    provenance of the model that ran)."""
    if chunk_hook is not None:
        chunk_hook(chunk)
    device = _worker_device(spec)
    model = _worker_model(spec, device)
    embeddings = embed_raw(model, batch.pixels, chunk.modality, device, spec.resolved_batch_size())
    return list(batch.patch_ids), embeddings, list(batch.skipped), model.provenance


# -- driver side --------------------------------------------------------------------------------
def local_cluster_kwargs(device: str) -> dict:
    """A local cluster sized to this machine: one worker per GPU, else one worker using all cores."""
    cores = os.cpu_count() or 1
    n_gpus = 0
    if device in ("auto", "cuda"):
        import torch

        n_gpus = torch.cuda.device_count()
    workers = max(1, n_gpus)
    return {
        "n_workers": workers,
        "threads_per_worker": max(2, cores // workers),
        "resources": {ENCODER_RESOURCE: 1},
        "processes": True,
        "dashboard_address": None,
        "silence_logs": logging.ERROR,
    }


def chunk_spans(chunks: list[Chunk], n_rows: int | None = None) -> list[ChunkSpan]:
    """Each chunk's row range in the store, in chunk order (the order the metadata lists patches)."""
    spans, start = [], 0
    for chunk in chunks:
        stop = start + chunk.n_patches
        spans.append(ChunkSpan(chunk.key, start, stop))
        start = stop
    if n_rows is not None and start != n_rows:
        raise RSRetrieveError(f"chunks list {start} patches but the metadata has {n_rows}")
    return spans


def encode(
    dataset: DatasetSpec,
    modality: Modality,
    store_path: str | Path,
    encoder: EncoderSpec,
    *,
    client=None,
    scheduler: str | None = None,
    dtype: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
    chunk_hook: Callable[[Chunk], None] | None = None,
    max_failed_share: float = MAX_FAILED_SHARE,
) -> EncodeSummary:
    """Encode every patch of `modality` not yet in the store.

    Patches that cannot be read are skipped, counted by reason and recorded in the store's
    attributes. The run fails (`TooManySkipped`) when no patch of the modality is encoded, or when
    more than `max_failed_share` of this run's patches were unreadable (nodata windows, a gap in
    the data rather than a failure, do not count).

    `client`: an existing dask.distributed Client; else `scheduler` (an address) is connected to;
    else a LocalCluster sized to the machine is started for this call (`cluster()` shares one
    across calls). `dtype`: float32 or float16 for a new store; None takes an existing store's.
    `on_start(total_patches, patches_to_do)` and `on_chunk(patches_written, patches_skipped)` drive
    a progress bar. `chunk_hook(chunk)` runs in the worker before each chunk is encoded (tests
    inject faults with it).
    """
    from rsretrieve import __version__
    from rsretrieve.models.inference import describe_model

    started = time.perf_counter()
    workers = cluster(client, scheduler, encoder.device)
    if workers.local:
        encoder.resolved_device()  # --device cuda without a GPU fails here, before anything is written
    ds = dataset.open()
    chunks = ds.chunks(modality)
    store = EmbeddingStore(store_path)
    provenance, dim = describe_model(encoder.model, encoder.config)
    reader = ds.describe() if hasattr(ds, "describe") else {}
    provenance = {**provenance, "rsretrieve_version": __version__, "dataset": {**dataset.to_dict(), "reader": reader}}
    if store.has(modality):
        spans = chunk_spans(chunks)
        dtype = store.check(modality, provenance, spans, dtype)
    else:
        meta = ds.metadata(modality)  # one row per patch: read only to create the store
        spans = chunk_spans(chunks, meta.num_rows)
        if not spans or spans[-1].stop == 0:
            raise RSRetrieveError(f"{dataset.name}{' / ' + dataset.subset if dataset.subset else ''}: the selection holds no {modality.upper()} patches")
        dtype = dtype or "float32"
        store.create(modality, meta, spans, dim, provenance, dtype)

    done = store.done_chunks(modality)
    todo = [(chunk, span) for chunk, span in zip(chunks, spans) if chunk.key not in done]
    summary = EncodeSummary(modality, Path(store_path), len(chunks), len(chunks) - len(todo), provenance=store.provenance(modality),
                            patches_total=spans[-1].stop)
    count_message = getattr(ds, "count_message", None)
    if count_message and count_message():
        summary.notes.append(count_message())
    if on_start:
        on_start(spans[-1].stop, sum(span.stop - span.start for _, span in todo))
    if todo:
        with workers:
            _run(workers.get(), dataset, encoder, store, modality, todo, summary, dtype, on_chunk, chunk_hook)
        if summary.skipped:
            store.record_skipped(modality, skip_counts(summary.skipped), [m for _, m in summary.skipped[:5]])
    summary.seconds = time.perf_counter() - started
    _check_skipped(store, modality, summary, sum(span.stop - span.start for _, span in todo), max_failed_share)
    return summary


def _check_skipped(store: EmbeddingStore, modality: Modality, summary: EncodeSummary, attempted: int, max_share: float) -> None:
    """TooManySkipped when the store holds no patch of the modality, or this run failed to read
    more than `max_share` of the patches it attempted."""
    label = modality.upper()
    if store.valid_count(modality) == 0:
        recorded = store.skipped(modality)
        why = summary.skip_summary() if summary.skipped else (
            "; ".join(f"{n} {reason}" for reason, n in recorded.get("by_reason", {}).items()) + "; first: " + "; ".join(recorded.get("examples", [])))
        raise TooManySkipped(f"{label}: none of the {summary.patches_total} patches could be encoded: {why}", summary)
    failed = sum(1 for _, message in summary.skipped if DATA_GAP not in skip_reason(message))
    if attempted and failed / attempted > max_share:
        raise TooManySkipped(f"{label}: {failed} of {attempted} patches ({failed / attempted:.0%}) could not be read, more than "
                             f"the {max_share:.0%} allowed; the others are in the store: {summary.skip_summary()}", summary)


class cluster:
    """The Dask client of an encode: a given client (or `cluster`), a connection to a scheduler, or
    a LocalCluster sized to the machine. Nothing starts before `get()`, and `with` closes what this
    object started, so a command that encodes both modalities enters one `cluster(...)`, passes it
    as `client` to each `encode`, and a run with nothing to encode starts nothing."""

    def __init__(self, client=None, scheduler: str | None = None, device: str = "auto"):
        self.given, self.scheduler, self.device = client, scheduler, device
        self.owned: list = []
        self._client = None

    @property
    def local(self) -> bool:
        """Whether the workers run on this machine (then its devices are theirs)."""
        if isinstance(self.given, cluster):
            return self.given.local
        return self.given is None and self.scheduler is None

    def __enter__(self) -> "cluster":
        return self

    def get(self):
        """The dask client, connected or started now if it was not yet."""
        from distributed import Client, LocalCluster

        if isinstance(self.given, cluster):
            return self.given.get()
        if self.given is not None:
            return self.given
        if self._client is None:
            if self.scheduler:
                try:
                    self._client = Client(self.scheduler, timeout="20s")
                except (OSError, ValueError, TimeoutError) as exc:
                    raise RSRetrieveError(f"--scheduler {self.scheduler}: cannot connect ({' '.join(str(exc).split())[:200]})") from None
            else:
                local = LocalCluster(**local_cluster_kwargs(self.device))
                self.owned.append(local)
                self._client = Client(local)
            self.owned.insert(0, self._client)
        return self._client

    def __exit__(self, *exc) -> None:
        for thing in self.owned:
            thing.close()
        self.owned.clear()
        self._client = None


def _encoder_resources(client) -> dict | None:
    """Claim the encoder resource only where every worker declares it (external clusters may not)."""
    workers = client.scheduler_info().get("workers", {}).values()
    if workers and all(ENCODER_RESOURCE in w.get("resources", {}) for w in workers):
        return {ENCODER_RESOURCE: 1}
    return None


def _run(client, dataset, encoder, store, modality, todo, summary, dtype, on_chunk, chunk_hook) -> None:
    from distributed import as_completed

    resources = _encoder_resources(client)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    window = 3 * workers  # chunks in flight: enough to overlap reads with encoding, bounded memory
    pending = list(reversed(todo))
    span_of = {}
    run = uuid.uuid4().hex[:8]  # task keys unique per run: a resumed run must not reuse failed tasks

    def submit_next(tracker):
        chunk, span = pending.pop()
        batch = client.submit(read_chunk, dataset, chunk, key=f"read-{modality}-{chunk.key}-{run}", pure=False)
        future = client.submit(encode_batch, batch, encoder, chunk_hook, chunk, resources=resources, key=f"encode-{modality}-{chunk.key}-{run}", pure=False)
        span_of[future.key] = span
        tracker.add(future)

    tracker = as_completed()
    for _ in range(min(window, len(pending))):
        submit_next(tracker)
    try:
        for future in tracker:
            if future.status == "error":
                cause = future.exception()
                _cancel(client, tracker)
                raise EncodeInterrupted(
                    f"encoding stopped at chunk {span_of[future.key].key}: {type(cause).__name__}: {cause}. "
                    f"{summary.chunks_encoded} chunks written this run are kept; run the same command again to resume",
                    summary,
                ) from cause
            patch_ids, embeddings, skipped, ran = future.result()
            span = span_of.pop(future.key)
            wrong = differences(ran, summary.provenance, MODEL_KEYS)
            if wrong:
                _cancel(client, tracker)
                raise EncodeInterrupted(
                    f"a worker ran {describe(ran)}, but the store holds {describe(summary.provenance)} (differs in "
                    f"{', '.join(wrong)}): workers must see the same checkpoint file; chunk {span.key} was not written",
                    summary,
                )
            store.write_chunk(modality, span, patch_ids, embeddings.astype(dtype, copy=False))
            summary.chunks_encoded += 1
            summary.patches_encoded += len(patch_ids)
            summary.skipped.extend(skipped)
            if on_chunk:
                on_chunk(span.stop - span.start, len(skipped))
            future.release()
            if pending:
                submit_next(tracker)
    except KeyboardInterrupt:
        _cancel(client, tracker)
        raise EncodeInterrupted(
            f"interrupted: {summary.chunks_encoded} chunks written this run are kept; run the same command again to resume",
            summary,
        ) from None


def _cancel(client, tracker) -> None:
    remaining = list(tracker.futures) if hasattr(tracker, "futures") else []
    if remaining:
        client.cancel(remaining)
    tracker.clear()
