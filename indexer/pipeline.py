"""The encoder stage: data chunks -> embeddings -> Zarr store, over a Dask cluster.

Each data chunk is read by a `read` task on a reader worker (`indexer.readers`: decoding to raw
values, on every core of every node), and groups of chunks adding up to a GPU-sized batch are
encoded by one `encode` task on an encoder worker (`indexer.encoder`: the model's preprocessing
and forward pass on its device). Dask moves the raw batches from readers to encoders; groups in
flight follow the cluster's read slots and a memory budget (`indexer.batching`). The cluster's
layout is `indexer.cluster`.

The driver writes each finished chunk into its region of the store and only then marks it done, so
an interrupted run resumes where it stopped and a finished run does nothing. A reader or encoder
worker that dies takes its tasks with it; Dask reruns them elsewhere and the run completes.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rsretrieve.bands import Modality
from rsretrieve.datasets import Chunk, patches_fingerprint
from rsretrieve.errors import RSRetrieveError
from rsretrieve.indexer.batching import groups, groups_in_flight
from rsretrieve.indexer.cluster import ENCODER_RESOURCE, READER_RESOURCE, cluster, local_cluster, slots, task_resources
from rsretrieve.indexer.devices import resolve_on_workers, with_store_precision
from rsretrieve.indexer.encoder import EncoderSpec, encode_group, refuse_non_finite
from rsretrieve.indexer.readers import DatasetSpec, read_chunk
from rsretrieve.indexer.skips import DATA_GAP, UNREACHABLE, skip_counts, skip_reason, skip_text, too_many_skipped, transient  # noqa: F401
from rsretrieve.provenance import MODEL_KEYS, describe, differences
from rsretrieve.io.locks import exclusive
from rsretrieve.store import ChunkSpan, EmbeddingStore
from rsretrieve.store.integrity import chunks_with_skips, damaged_chunks, store_damage
from rsretrieve.store.repair import repair
from rsretrieve.store.grow import new_rows_meta, plan_spans
from rsretrieve.store.writer import ShardWriter

__all__ = ["ENCODER_RESOURCE", "READER_RESOURCE", "DatasetSpec", "EncodeInterrupted", "EncodeSummary", "EncoderSpec",
           "TooManySkipped", "cluster", "encode", "local_cluster"]

FLOAT16_FROM = 1_000_000  # archives at least this large are stored as float16 unless a dtype is asked for
MAX_FAILED_SHARE = 0.05  # share of a selection's patches that may be unreadable (--max-skipped; nodata windows are not failures)
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
    retry: dict[str, dict[str, int]] = field(default_factory=dict)  # chunks with patches that could not be reached: their skips
    patches_total: int = 0
    converted: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, what the reader converted)

    def conversion_note(self) -> str | None:
        """'converted on reading: 18 patches: S1 integer dB converted to float32' (one line), or None."""
        if not self.converted:
            return None
        counts = Counter(what for _, what in self.converted)
        return "converted on reading: " + ", ".join(f"{n} patch{'es' if n != 1 else ''}: {what}" for what, n in counts.most_common())

    def skip_summary(self, examples: int = 3) -> str:
        """'3 skipped: 2 missing band file, 1 invalid pixel(s) ...; first: <path>, ...' (one line)."""
        return skip_text(skip_counts(self.skipped), [message for _, message in self.skipped[:examples]])

    @property
    def patches_per_second(self) -> float:
        return self.patches_encoded / self.seconds if self.seconds > 0 else 0.0

    @property
    def nothing_to_do(self) -> bool:
        return self.chunks_already_done == self.chunks_total


class EncodeFailed(RSRetrieveError):
    """An encode that did not end well, with the summary of what it did."""

    def __init__(self, message: str, summary: EncodeSummary):
        super().__init__(message)
        self.summary = summary


class TooManySkipped(EncodeFailed):
    """Every patch of a modality, or more than the allowed share of them, could not be read. What
    was encoded stays in the store; the message says what was skipped and why."""


class EncodeInterrupted(EncodeFailed):
    """The run stopped (a task failed, or Ctrl-C); what was written stays valid and resumable."""


class EncodeCancelled(EncodeInterrupted):
    """Ctrl-C: the CLI exits 130, the shell's code for an interrupt."""

    exit_code = 130


# -- driver side --------------------------------------------------------------------------------
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
    read_hook: Callable[[Chunk], None] | None = None,
    max_failed_share: float = MAX_FAILED_SHARE,
    retry_skipped: bool = False,
    on_wait: Callable[[str], None] | None = None,
    on_model: Callable[[dict], None] | None = None,
) -> EncodeSummary:
    """Encode every patch of `modality` not yet in the store.

    Patches that cannot be read are skipped, counted by reason and recorded in the store's
    attributes. The run fails (`TooManySkipped`) when no patch of the modality is encoded, or when
    more than `max_failed_share` of the selection's patches are not in the store (nodata windows, a
    gap in the data rather than a failure, do not count), on this run and every later one.

    `client`: an existing dask.distributed Client; else `scheduler` (an address) is connected to;
    else a local cluster sized to the machine (`indexer.cluster.local_layout`) is started for this
    call (`cluster()` shares one across calls). `dtype`: float32 or float16 for a new store; None takes an existing store's.
    `on_start(total_patches, patches_to_do)` and `on_chunk(patches_written, patches_skipped)` drive
    a progress bar. `chunk_hook(chunk)` runs on the encoder worker before each chunk is encoded,
    `read_hook(chunk)` on the reader before each chunk is read (tests inject faults with them).
    `on_model(provenance)` runs once the model is known, whatever happens next (the CLI's
    random-weights notice).

    A store group that is complete and intact is only read (no lock, no write). Otherwise the run
    holds the store's lock (`on_wait(who)` is called if another process holds it, then it waits),
    encodes again what `store.integrity` finds damaged and, with `retry_skipped`, the chunks whose
    patches were skipped (a file fixed since)."""
    started = time.perf_counter()
    workers = cluster(client, scheduler, encoder.device)
    if workers.local:
        encoder.resolved_device()  # --device cuda without a GPU fails here, before anything is written
    ds = dataset.open()
    store = EmbeddingStore(store_path)
    damaged = store.has(modality) and bool(store_damage(store, modality))  # every array read once: checksums, lost files, invariants
    chunks, spans, held = _plan(store, modality, ds.chunks(modality)) if not damaged else (ds.chunks(modality), [], None)
    provenance, dim = _provenance(dataset, ds, chunks, encoder)
    if on_model:
        on_model(provenance)
    if store.has(modality):  # its compute precision, or a refusal naming the flag that resumes it
        encoder = with_store_precision(encoder, store.provenance(modality), str(store.path), modality)
        provenance["precision"] = encoder.precision
    if store.has(modality) and not damaged:  # a damaged group is repaired first, under the lock
        store.check(modality, provenance, spans, dtype, held)  # another model or other data is refused here
        moved = store.moved_root(modality, provenance) is not None
        if held is None and not moved and not _work_left(store, modality, retry_skipped):  # read-only: nothing written, no lock
            summary = _finish(EncodeSummary(modality, Path(store_path), len(chunks), len(chunks), provenance=store.provenance(modality),
                                            patches_total=spans[-1].stop), ds, on_start, started)
            _check_skipped(store, modality, summary, max_failed_share)
            return summary
    # one writer per store (a second run waits, then finds the work done); the cluster starts on first use
    with exclusive(store.path, on_wait), workers:
        repaired = repair(store, modality, lambda: _data_record(ds, modality)) if store.has(modality) else []
        chunks, spans, held = _plan(store, modality, ds.chunks(modality))  # again, under the lock
        if not store.has(modality) and spans and spans[-1].stop:  # a new store records the encoder workers' precision
            encoder = resolve_on_workers(workers.get(), encoder)
            provenance["precision"] = encoder.precision
        dtype, notes = _prepare(store, ds, modality, provenance, spans, dim, dtype, retry_skipped, held)
        notes = repaired + notes
        done = store.done_chunks(modality)
        todo = [(chunk, span) for chunk, span in zip(chunks, spans) if chunk.key not in done]
        summary = EncodeSummary(modality, Path(store_path), len(chunks), len(chunks) - len(todo), provenance=store.provenance(modality),
                                patches_total=spans[-1].stop, notes=notes)
        _finish(summary, ds, on_start, None, sum(span.stop - span.start for _, span in todo))
        if todo:
            _run(workers.get(), dataset, encoder, store, modality, todo, summary, dtype, on_chunk, chunk_hook, read_hook)
            if summary.skipped:
                store.record_skipped(modality, skip_counts(summary.skipped), [m for _, m in summary.skipped[:5]], summary.retry)
            if summary.converted:
                summary.notes.append(summary.conversion_note())
        summary.seconds = time.perf_counter() - started
        _check_skipped(store, modality, summary, max_failed_share)
    return summary


def _plan(store: EmbeddingStore, modality: Modality, chunks: list[Chunk]) -> tuple[list[Chunk], list[ChunkSpan], str | None]:
    """(the data's chunks in store order, their spans, the fingerprint of the chunks the store
    holds if the data has more: it grew). A new group takes the dataset's order; an existing one
    keeps its chunks where they are and gains the new ones after them."""
    if not store.has(modality):
        return chunks, chunk_spans(chunks), None
    stored, _ = store.ledger(modality)
    spans, new = plan_spans(stored, chunks, store.path)
    known = {span.key for span in stored}
    by_key = {chunk.key: chunk for chunk in chunks}
    ordered = [by_key[span.key] for span in stored] + new
    return ordered, spans, (patches_fingerprint([c for c in ordered if c.key in known]) if new else None)


def _data_record(ds, modality: Modality) -> tuple[object, list[ChunkSpan], str]:
    """What a damaged group is repaired from: the data's patch rows, chunk rows and fingerprint."""
    chunks = ds.chunks(modality)
    return ds.patch_rows(modality), chunk_spans(chunks), patches_fingerprint(chunks)


def default_dtype(n_rows: int) -> str:
    """float16 from `FLOAT16_FROM` patches (cosine rankings barely move; the disk halves), else float32."""
    return "float16" if n_rows >= FLOAT16_FROM else "float32"


def _provenance(dataset: DatasetSpec, ds, chunks: list[Chunk], encoder: EncoderSpec) -> tuple[dict, int]:
    """(provenance of the embeddings this run would write, their dimension): the model, and the data
    they are made from (dataset, root, subset, options and a fingerprint of the patch list)."""
    from rsretrieve import __version__
    from rsretrieve.models.inference import describe_model

    provenance, dim = describe_model(encoder.model, encoder.config)
    reader = ds.describe() if hasattr(ds, "describe") else {}
    made_from = {**dataset.to_dict(), "reader": reader, "patches_sha256": patches_fingerprint(chunks),
                 "patches": sum(chunk.n_patches for chunk in chunks)}
    return {**provenance, "rsretrieve_version": __version__, "dataset": made_from}, dim


def _work_left(store: EmbeddingStore, modality: Modality, retry_skipped: bool) -> bool:
    """Whether a store group lacks chunks, holds damaged ones or ones whose patches could not be
    reached, or (asked to retry) skipped patches, or
    its metadata was never consolidated (a crash right after creating it)."""
    _, done = store.ledger(modality)
    return (not done.all() or store.needs_consolidation(modality) or bool(damaged_chunks(store, modality))
            or bool(store.skipped(modality).get("retry")) or (retry_skipped and bool(chunks_with_skips(store, modality))))


def _prepare(store: EmbeddingStore, ds, modality: Modality, provenance: dict, spans: list[ChunkSpan], dim: int, dtype: str | None,
             retry_skipped: bool, held: str | None = None) -> tuple[str, list[str]]:
    """Under the store's lock: create the group, or check it again and mark what must be encoded
    again (damaged chunks, chunks with patches that could not be reached; with `retry_skipped`,
    every chunk with skipped patches). Returns (the group's
    dtype, notes for the user)."""
    if not store.has(modality):
        # one row per patch, to create the store (a slab at a time); the readers find lat/lon as they read
        meta = ds.patch_rows(modality)
        if not spans or spans[-1].stop == 0:
            made_from = provenance["dataset"]
            subset = f" / {made_from['subset']}" if made_from.get("subset") else ""
            raise RSRetrieveError(f"{made_from['name']}{subset}: the selection holds no {modality.upper()} patches")
        if spans[-1].stop != meta.num_rows:
            raise RSRetrieveError(f"chunks list {spans[-1].stop} patches but the metadata has {meta.num_rows}")
        chosen = dtype or default_dtype(spans[-1].stop)
        store.create(modality, meta, spans, dim, provenance, chosen)
        note = f"{spans[-1].stop:,} patches: embeddings stored as float16 (half the disk)" if chosen != (dtype or "float32") else None
        return chosen, [note] if note else []
    dtype = store.check(modality, provenance, spans, dtype, held)
    notes = _record_move(store, modality, provenance) + _grow(store, ds, modality, provenance, spans)
    store.consolidate_if_needed(modality)
    damaged = damaged_chunks(store, modality)
    if damaged:
        store.reset_chunks(modality, damaged)
        key, why = next(iter(damaged.items()))
        notes.append(f"{len(damaged)} damaged chunk(s) are encoded again (first: {key}: {why})")
    if retry_skipped:
        retried = chunks_with_skips(store, modality)
        store.reset_chunks(modality, retried)
        store.clear_skipped(modality)
        notes.append(f"{len(retried)} chunk(s) with skipped patches are read again")
    elif store.skipped(modality).get("retry"):
        unreached = store.take_retry(modality)
        store.reset_chunks(modality, unreached)
        notes.append(f"{len(unreached)} chunk(s) with patches that could not be reached last time are read again")
    return dtype, notes


def _record_move(store: EmbeddingStore, modality: Modality, provenance: dict) -> list[str]:
    """The same patches found at another root: the store serves them from there now."""
    old = store.moved_root(modality, provenance)
    if old is None:
        return []
    store.record_root(modality, provenance["dataset"]["root"])
    return [f"the data moved from {old} to {provenance['dataset']['root']} (the same patches): the store now reads it there"]


def _grow(store: EmbeddingStore, ds, modality: Modality, provenance: dict, spans: list[ChunkSpan]) -> list[str]:
    """Append the chunks the data gained to the group (nothing if it has them all)."""
    stored, _ = store.ledger(modality)
    recorded = (store.provenance(modality).get("dataset") or {}).get("patches_sha256")
    if len(spans) == len(stored) and recorded == provenance["dataset"]["patches_sha256"]:
        return []
    chunks = ds.chunks(modality)
    _, new = plan_spans(stored, chunks, store.path)  # the chunks past the ledger, as `_plan` found them
    store.grow(modality, spans, new_rows_meta(ds.patch_rows(modality), chunks, new), provenance)
    added = sum(chunk.n_patches for chunk in new)
    return [f"the data grew: {len(new)} new chunk(s), {added} patches appended to the store"] if new else []


def _finish(summary: EncodeSummary, ds, on_start, started: float | None, todo_patches: int = 0) -> EncodeSummary:
    """Add the dataset's note on its count, report the start, and (given `started`) the time."""
    count_message = getattr(ds, "count_message", None)
    if count_message and count_message():
        summary.notes.append(count_message())
    if on_start:
        on_start(summary.patches_total, todo_patches)
    if started is not None:
        summary.seconds = time.perf_counter() - started
    return summary


def _check_skipped(store: EmbeddingStore, modality: Modality, summary: EncodeSummary, max_share: float) -> None:
    message = too_many_skipped(store, modality, summary, max_share)
    if message:
        raise TooManySkipped(message, summary)


def _run(client, dataset, encoder, store, modality, todo, summary, dtype, on_chunk, chunk_hook, read_hook) -> None:
    from distributed import as_completed

    read_resources, encode_resources = task_resources(client)
    read_slots, encoder_slots = slots(client)
    encoder = resolve_on_workers(client, encoder)  # batch size and precision where the model runs, never here
    work = groups(todo, [span.stop - span.start for _, span in todo], encoder.batch_size)
    window = groups_in_flight(read_slots, encoder_slots, len(todo) / len(work), sum(s.stop - s.start for _, s in todo) / len(work))
    pending = list(reversed(work))
    spans_of: dict[str, dict[str, ChunkSpan]] = {}
    run = uuid.uuid4().hex[:8]  # task keys unique per run: a resumed run must not reuse failed tasks

    def submit_next(tracker):
        group = pending.pop()
        reads = [client.submit(read_chunk, dataset, chunk, read_hook, key=f"read-{modality}-{chunk.key}-{run}",
                               resources=read_resources, pure=False) for chunk, _ in group]
        future = client.submit(encode_group, reads, [chunk for chunk, _ in group], encoder, chunk_hook,
                               key=f"encode-{modality}-{group[0][0].key}-{run}", resources=encode_resources, pure=False)
        spans_of[future.key] = {chunk.key: span for chunk, span in group}
        tracker.add(future)

    tracker = as_completed()
    for _ in range(min(window, len(pending))):
        submit_next(tracker)
    # shards are written whole once their rows are in; leaving the block writes what waits
    with ShardWriter(store, modality, [span for _, span in todo]) as writer:
        _collect(client, tracker, spans_of, pending, submit_next, writer, summary, dtype, on_chunk)


def _collect(client, tracker, spans_of, pending, submit_next, writer, summary, dtype, on_chunk) -> None:
    try:
        for future in tracker:
            spans = spans_of.pop(future.key)
            if future.status == "error":
                cause = future.exception()
                _cancel(client, tracker)
                raise EncodeInterrupted(
                    f"encoding stopped at chunk {next(iter(spans))}: {type(cause).__name__}: {cause}. "
                    f"{summary.chunks_encoded} chunks written this run are kept; run the same command again to resume",
                    summary,
                ) from cause
            results, ran = future.result()
            _refuse_non_finite(client, tracker, results, ran)
            wrong = differences(ran, summary.provenance, (*MODEL_KEYS, "precision"))
            if wrong:
                _cancel(client, tracker)
                raise EncodeInterrupted(
                    f"a worker ran {describe(ran)}, but the store holds {describe(summary.provenance)} (differs in "
                    f"{', '.join(wrong)}): workers must see the same checkpoint file; chunk {next(iter(spans))} was not written",
                    summary,
                )
            for result in results:
                span = spans[result.key]
                writer.add(span, result.patch_ids, result.embeddings.astype(dtype, copy=False), result.locations)
                summary.chunks_encoded += 1
                summary.patches_encoded += len(result.patch_ids)
                summary.skipped.extend(result.skipped)
                if any(transient(message) for _, message in result.skipped):
                    summary.retry[result.key] = dict(skip_counts(result.skipped))
                summary.converted.extend(result.converted)
                if on_chunk:
                    on_chunk(span.stop - span.start, len(result.skipped))
            future.release()
            if pending:
                submit_next(tracker)
    except KeyboardInterrupt:
        _cancel(client, tracker)
        raise EncodeCancelled(
            f"interrupted: {summary.chunks_encoded} chunks written this run are kept; run the same command again to resume",
            summary,
        ) from None


def _refuse_non_finite(client, tracker, results, ran) -> None:
    """A model that gives NaN/inf stops the run in one line naming its checkpoint, nothing written."""
    try:
        refuse_non_finite(results, ran)
    except RSRetrieveError:
        _cancel(client, tracker)
        raise


def _cancel(client, tracker) -> None:
    remaining = list(tracker.futures) if hasattr(tracker, "futures") else []
    if remaining:
        client.cancel(remaining)
    tracker.clear()
