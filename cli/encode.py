"""`rsretrieve encode` and `rsretrieve index`: embeddings into the store, then FAISS indexes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rsretrieve.cli._app import (
    BBoxOpt,
    BatchOpt,
    CellsOpt,
    CheckpointOpt,
    CompileOpt,
    ComputeChoice,
    ComputeOpt,
    DashboardOpt,
    DatasetOpt,
    DatesOpt,
    DeviceChoice,
    DeviceOpt,
    IndexKind,
    MaxNodataOpt,
    MaxSkippedOpt,
    ModalityOrBoth,
    ModelOpt,
    PrecisionOpt,
    ReadersOpt,
    RootOpt,
    SchedulerOpt,
    State,
    StoreOpt,
    SubsetOpt,
    WindowsOpt,
    app,
    console,
    err,
    tile_filters,
    make_job,
    modalities_of,
    require_faiss,
    store_dtype,
    waiting,
    warn_if_random,
)
from rsretrieve.errors import ModalityAbsent


def _encode_with_progress(job, modality: str, client=None, retry_skipped: bool = False):
    from rsretrieve.indexer.jobs import ensure_embeddings
    from rsretrieve.indexer.pipeline import TooManySkipped

    columns = (
        TextColumn(f"[bold]{modality.upper()}[/] {{task.fields[stage]}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} patches/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False, disable=State.quiet) as progress:
        task = progress.add_task("encode", total=None, rate="-", stage="starting workers, loading the model", visible=False)

        def on_start(total: int, todo: int) -> None:
            # the data opened and the model was described: the arguments are valid, so they become
            # current now (an interrupted first run is resumed by the short command)
            State.workspace.remember(job.selection)
            progress.update(task, total=todo, visible=todo > 0)

        def on_chunk(written: int, skipped: int) -> None:
            progress.advance(task, written)
            elapsed = progress.tasks[task].elapsed or 0
            done = progress.tasks[task].completed
            progress.update(task, rate=f"{done / elapsed:.1f}" if elapsed else "-", stage="encoding")

        try:
            summary = ensure_embeddings(job, modality, client=client, on_start=on_start, on_chunk=on_chunk, on_wait=waiting,
                                        retry_skipped=retry_skipped, on_model=warn_if_random)
        except TooManySkipped as exc:
            progress.stop()
            _print_encode_summary(exc.summary)  # what was encoded and skipped, before the one-line error
            raise
    _print_encode_summary(summary)
    return summary


def encode_all(job, modalities, retry_skipped: bool = False, both: bool = False) -> list[str]:
    """Encode what is missing or damaged for each modality, on one cluster started only if there is
    work; returns the modalities encoded. A modality with too many unreadable patches does not stop
    the others: every modality is encoded, then the first such failure is raised (the same one on
    every run). With `both` (the user asked for both modalities, or left it to the default), a
    modality the data root holds none of is left out with a note."""
    from rsretrieve.indexer.jobs import job_cluster
    from rsretrieve.indexer.pipeline import TooManySkipped

    if job.scheduler and not State.quiet:
        err.print(f"connecting to the Dask scheduler at {job.scheduler} (if there is work; waits up to 20 s)", highlight=False)
    failures, absent = [], []
    with job_cluster(job, on_connect=_say_dashboard if job.dashboard else None) as client:
        for m in modalities:
            try:
                _encode_with_progress(job, m, client, retry_skipped)
            except TooManySkipped as exc:
                failures.append(exc)
            except ModalityAbsent as exc:
                if not both or len(absent) == len(modalities) - 1:
                    raise
                absent.append(m)
                State.status_console().print(f"[yellow]note:[/] {m.upper()} is absent ({exc}): only "
                                             f"{', '.join(x.upper() for x in modalities if x != m)} encoded", highlight=False)
    if len(failures) > 1:
        State.status_console().print(f"[red]{len(failures) - 1} more modality failed:[/] " + "; ".join(map(str, failures[1:])),
                                     highlight=False)
    if failures:
        raise failures[0]
    return [m for m in modalities if m not in absent]


def _say_dashboard(client) -> None:
    err.print(f"Dask dashboard: {client.dashboard_link}", highlight=False)


def _print_encode_summary(summary) -> None:
    warn_if_random(summary.provenance)
    console = State.status_console()
    for note in summary.notes if not State.quiet else ():
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if summary.nothing_to_do:
        console.print(f"{summary.modality.upper()}: all {summary.chunks_total} chunks already encoded in {summary.store} — nothing to do")
        return
    console.print(
        f"{summary.modality.upper()}: encoded {summary.patches_encoded} patches in {summary.chunks_encoded} chunks "
        f"({summary.chunks_already_done} already done) in {summary.seconds:.1f} s — {summary.patches_per_second:.1f} patches/s"
    )
    if summary.skipped:
        console.print(f"[yellow]skipped {len(summary.skipped)} patches:[/]")
        for patch_id, reason in summary.skipped[:20]:
            console.print(f"  {patch_id}: {reason}", highlight=False)
        if len(summary.skipped) > 20:
            console.print(f"  … and {len(summary.skipped) - 20} more")


@app.command()
def encode(
    dataset: DatasetOpt = None,
    data_root: RootOpt = None,
    subset: SubsetOpt = None,
    modality: Annotated[ModalityOrBoth, typer.Option("--modality", help="s1 | s2 | both")] = ModalityOrBoth.both,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    batch_size: BatchOpt = None,
    scheduler: SchedulerOpt = None,
    store: StoreOpt = None,
    float16: PrecisionOpt = None,
    windows: WindowsOpt = None,
    compile: CompileOpt = False,
    readers: ReadersOpt = None,
    dashboard: DashboardOpt = None,
    cells: CellsOpt = None,
    bbox: BBoxOpt = None,
    dates: DatesOpt = None,
    max_nodata: MaxNodataOpt = None,
    max_skipped: MaxSkippedOpt = None,
    precision: ComputeOpt = ComputeChoice.auto,
    retry_skipped: Annotated[bool, typer.Option("--retry-skipped", help="Read again the patches earlier runs skipped (a file fixed since).")] = False,
) -> None:
    """Compute the model's embeddings for every patch not yet in the store (resumable); chunks that
    `rsretrieve verify` finds damaged are encoded again."""
    job = make_job(dataset, data_root, subset, model, checkpoint, device, batch_size, scheduler, store, store_dtype(float16),
                   windows, compile, readers, dashboard, tile_filters(cells, bbox, dates, max_nodata), max_skipped,
                   precision)
    subset_note = f" / {job.selection.subset}" if job.selection.subset else ""
    console.print(f"dataset [cyan]{job.selection.dataset}[/]{subset_note} → store {job.store_path}")
    encode_all(job, modalities_of(modality), retry_skipped, both=modality is ModalityOrBoth.both)
    State.workspace.remember(job.selection)


@app.command()
def index(
    modality: Annotated[ModalityOrBoth, typer.Option("--modality", help="s1 | s2 | both")] = ModalityOrBoth.both,
    kind: Annotated[IndexKind, typer.Option("--index", help="auto: exact below 1M vectors, IVF-PQ on disk with re-ranking from the store above.")] = IndexKind.auto,
    dataset: DatasetOpt = None,
    data_root: RootOpt = None,
    subset: SubsetOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    batch_size: BatchOpt = None,
    scheduler: SchedulerOpt = None,
    store: StoreOpt = None,
    float16: PrecisionOpt = None,
    gpu_search: Annotated[bool, typer.Option("--gpu-search", help="Build/search through faiss on a GPU when it has one.")] = False,
    windows: WindowsOpt = None,
    compile: CompileOpt = False,
    readers: ReadersOpt = None,
    dashboard: DashboardOpt = None,
    cells: CellsOpt = None,
    bbox: BBoxOpt = None,
    dates: DatesOpt = None,
    max_nodata: MaxNodataOpt = None,
    max_skipped: MaxSkippedOpt = None,
    precision: ComputeOpt = ComputeChoice.auto,
) -> None:
    """Encode what is missing for a modality, then build its FAISS index (only what is missing)."""
    from rsretrieve.indexer.jobs import ensure_index

    require_faiss()  # before any encoding: the index is the point of this command
    job = make_job(dataset, data_root, subset, model, checkpoint, device, batch_size, scheduler, store, store_dtype(float16), windows,
                   compile, readers, dashboard, tile_filters(cells, bbox, dates, max_nodata), max_skipped,
                   precision)
    encoded = encode_all(job, modalities_of(modality), both=modality is ModalityOrBoth.both)
    from rsretrieve.indexer.jobs import job_cluster

    notices = []
    with job_cluster(job) as client:  # started only if an ivfpq-disk index adds its parts on it
        for m in encoded:
            outcome = ensure_index(job, m, kind=kind.value, use_gpu=gpu_search, on_wait=waiting, client=client)
            verb = "built" if outcome.built else "up to date:"
            grown = f" (+{outcome.added} new)" if outcome.added is not None else ""
            console.print(f"{m.upper()}: index {verb} {outcome.kind} over {outcome.vectors} vectors{grown} → {outcome.path}")
            console.print(f"{m.upper()} index: {outcome.summary()}", highlight=False)
            notices.append(outcome.gpu_notice)
    for note in dict.fromkeys(n for n in notices if n) if not State.quiet else ():  # once, not once per modality
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    State.workspace.remember(job.selection)
