"""The commands of `rsretrieve`. Each parses, calls the library or `indexer.jobs`, and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cli.app import (
    DatasetChoice,
    DeviceChoice,
    IndexKind,
    ModalityChoice,
    ModalityOrBoth,
    OutputFormat,
    State,
    app,
    console,
    err,
    print_json,
)
from rsretrieve.errors import RSRetrieveError
from rsretrieve.provenance import is_random_init

RANDOM_INIT_WARNING = (
    "[bold white on red] RANDOM WEIGHTS [/] the model has no trained checkpoint: embeddings, neighbours and "
    "scores are NOT meaningful results. Pass --checkpoint with real CSMoE/CSMAE weights."
)


_warned: set[str] = set()


def _warn_if_random(provenance: dict) -> None:
    """The random-weights banner, once per command."""
    if is_random_init(provenance) and "random" not in _warned:
        _warned.add("random")
        err.print(RANDOM_INIT_WARNING)


def _modalities(choice: ModalityOrBoth) -> list[str]:
    return ["s1", "s2"] if choice is ModalityOrBoth.both else [choice.value]


# -- info / models ---------------------------------------------------------------------------------
@app.command()
def info(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Workspace location, stores found, counts per modality, model provenance."""
    from rsretrieve.store import EmbeddingStore

    ws = State.workspace
    selection = ws.select(remember=False)
    stores = [EmbeddingStore(p).summary() for p in ws.stores()]
    data = {
        "workspace": str(ws.path.resolve()),
        "workspace_exists": ws.path.exists(),
        "current": {"dataset": selection.dataset, "subset": selection.subset, "root": selection.root, "model": selection.model, "checkpoint": selection.checkpoint},
        "datasets": ws.load_config().get("datasets", {}),
        "stores": stores,
    }
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]workspace[/] {data['workspace']}" + ("" if ws.path.exists() else " [dim](not created yet)[/]"))
    console.print(f"[bold]current[/]   dataset [cyan]{selection.dataset}{' / ' + selection.subset if selection.subset else ''}[/] model [cyan]{selection.model}[/]" + (f" checkpoint {selection.checkpoint}" if selection.checkpoint else ""))
    if not stores:
        console.print("[dim]no embedding stores yet: run `rsretrieve index --modality s1`[/]")
        return
    table = Table(title="embedding stores")
    for column in ("store", "modality", "encoded / patches", "complete", "model", "weights"):
        table.add_column(column)
    for store in stores:
        for modality, row in store["modalities"].items():
            weights = "[red]random-init[/]" if row["random_init"] else str(row["checkpoint_sha256"])[:12]
            table.add_row(Path(store["path"]).name, modality, f"{row['encoded']} / {row['patches']}", "yes" if row["complete"] else "no", str(row["model"]), weights)
    console.print(table)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Registered model configs with parameters and MACs per image, beside the paper's Table IV."""
    from rsretrieve.macs import model_report

    rows = model_report()
    if as_json:
        print_json(rows)
        return
    table = Table(title="Model configs beside the paper's Table IV (MACs per image, fvcore convention)")
    for column in ("model", "params", "Table IV", "MACs S2", "MACs S1", "Table IV", "C2C (paper)"):
        table.add_column(column, justify="left" if column == "model" else "right")

    def paper(value, deviation, unit, scale):
        if not value:
            return "-"
        return f"{value / scale:.{0 if unit == 'M' else 2}f}{unit} ({deviation * 100:+.1f}%)"

    for r in rows:
        deviations = r.get("deviations") or {}
        one_path = r.get("params_basis") == "s2-path"  # CSMAE's 87M is one ViT-B path
        params = r["params_s2_path"] if one_path else r["params"]
        table.add_row(
            r["name"],
            f"{params / 1e6:.1f}M" + ("¹" if one_path else ""),
            paper(r.get("paper_params"), deviations.get("params", 0), "M", 1e6),
            f"{r['macs_s2'] / 1e9:.2f}B",
            f"{r['macs_s1'] / 1e9:.2f}B",
            paper(r.get("paper_macs"), deviations.get("macs", 0), "B", 1e9),
            f"{r['c2c']:.1f} ({r['paper_c2c']:.1f})" if r.get("paper_c2c") else f"{r['c2c']:.1f}",
        )
    console.print(table)
    console.print("[dim]¹ one modality path, as the paper counts CSMAE; CSMoE counts both modality encoders.[/]")
    console.print("[dim]Structure and residuals: docs/MODEL.md[/]")


# -- encode / index --------------------------------------------------------------------------------
DatasetOpt = Annotated[Optional[DatasetChoice], typer.Option("--dataset", help="sample | benv2 | majortom [default: the current one, else sample]")]
RootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Dataset root; remembered in the workspace after first use.")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="Named subset, e.g. BENv2-14k or BENv2-243k.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Config name [default: current, else csmoe-p16].")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="rsretrieve .safetensors or CSMAE Lightning checkpoint.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the encoder runs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="[default: 32 on CPU, 256 on GPU]")]
SchedulerOpt = Annotated[Optional[str], typer.Option("--scheduler", help="Address of a dask.distributed scheduler [default: a local cluster].")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Store path [default: one per dataset, subset and model in the workspace].")]


def _job(dataset, data_root, subset, model, checkpoint, device=DeviceChoice.auto, batch_size=None, scheduler=None, store=None, dtype=None):
    from indexer.jobs import Job

    if data_root is not None and not Path(data_root).exists():
        raise RSRetrieveError(f"{data_root}: --data-root does not exist")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise RSRetrieveError(f"{checkpoint}: --checkpoint does not exist")
    # remembered only once the command has succeeded: a bad --checkpoint must not become current
    if subset is not None:
        from rsretrieve.subsets import get_subset

        subset = get_subset(subset).name  # unknown names fail here, with the known ones listed
    selection = State.workspace.select(dataset.value if dataset else None, data_root, model, checkpoint, subset, remember=False)
    if data_root is not None and selection.dataset == "sample":
        raise RSRetrieveError(f"{data_root}: --data-root needs --dataset benv2 or majortom (the bundled sample has its own)")
    return Job(State.workspace, selection, store, device.value, batch_size, scheduler, dtype)


def _encode_with_progress(job, modality: str, client=None):
    from indexer.jobs import ensure_embeddings

    columns = (
        TextColumn(f"[bold]{modality.upper()}[/] encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} patches/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("encode", total=None, rate="-", visible=False)

        def on_start(total: int, todo: int) -> None:
            progress.update(task, total=todo, visible=todo > 0)

        def on_chunk(written: int, skipped: int) -> None:
            progress.advance(task, written)
            elapsed = progress.tasks[task].elapsed or 0
            done = progress.tasks[task].completed
            progress.update(task, rate=f"{done / elapsed:.1f}" if elapsed else "-")

        summary = ensure_embeddings(job, modality, client=client, on_start=on_start, on_chunk=on_chunk)
    _print_encode_summary(summary)
    return summary


def _encode_all(job, modalities) -> None:
    """Encode what is missing for each modality, on one cluster started only if there is work."""
    from indexer.jobs import job_cluster

    with job_cluster(job) as client:
        for m in modalities:
            _encode_with_progress(job, m, client)


def _print_encode_summary(summary) -> None:
    _warn_if_random(summary.provenance)
    for note in summary.notes:
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
    float16: Annotated[bool, typer.Option("--float16", help="Store embeddings as float16 (half the disk).")] = False,
) -> None:
    """Compute CSMoE [CLS] embeddings for every patch not yet in the store (resumable)."""
    job = _job(dataset, data_root, subset, model, checkpoint, device, batch_size, scheduler, store, "float16" if float16 else None)
    subset_note = f" / {job.selection.subset}" if job.selection.subset else ""
    console.print(f"dataset [cyan]{job.selection.dataset}[/]{subset_note} → store {job.store_path}")
    _encode_all(job, _modalities(modality))
    State.workspace.remember(job.selection)


@app.command()
def index(
    modality: Annotated[ModalityOrBoth, typer.Option("--modality", help="s1 | s2 | both")] = ModalityOrBoth.both,
    kind: Annotated[IndexKind, typer.Option("--index", help="auto: exact below 1M vectors, IVF-PQ with re-ranking above.")] = IndexKind.auto,
    dataset: DatasetOpt = None,
    data_root: RootOpt = None,
    subset: SubsetOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    batch_size: BatchOpt = None,
    scheduler: SchedulerOpt = None,
    store: StoreOpt = None,
    gpu_search: Annotated[bool, typer.Option("--gpu-search", help="Build/search through faiss on a GPU when it has one.")] = False,
) -> None:
    """Encode what is missing for a modality, then build its FAISS index (only what is missing)."""
    from indexer.jobs import ensure_index

    job = _job(dataset, data_root, subset, model, checkpoint, device, batch_size, scheduler, store)
    _encode_all(job, _modalities(modality))
    for m in _modalities(modality):
        outcome = ensure_index(job, m, kind=kind.value, use_gpu=gpu_search)
        verb = "built" if outcome.built else "up to date:"
        console.print(f"{m.upper()}: index {verb} {outcome.kind} over {outcome.vectors} vectors → {outcome.path}")
    State.workspace.remember(job.selection)


# -- query -----------------------------------------------------------------------------------------
@app.command()
def query(
    tile: Annotated[Optional[Path], typer.Argument(help="GeoTIFF to search with: 2 bands (S1 VV,VH) or 10/12 bands (S2).")] = None,
    target: Annotated[ModalityChoice, typer.Option("--target", help="Modality of the archive to search.")] = ModalityChoice.s2,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of results.")] = 10,
    modality: Annotated[Optional[ModalityChoice], typer.Option("--modality", help="Modality of the query [default: detected].")] = None,
    patch_id: Annotated[Optional[str], typer.Option("--id", help="Query with an archive patch instead of a file.")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table | json | geojson")] = OutputFormat.table,
    mosaic: Annotated[Optional[Path], typer.Option("--mosaic", help="Write a PNG of the query beside its results.")] = None,
    store: StoreOpt = None,
    subset: SubsetOpt = None,
    gpu_search: Annotated[bool, typer.Option("--gpu-search", help="Search through faiss on a GPU when it has one.")] = False,
) -> None:
    """Search an archive with a tile (or an archive patch) in the same or the other modality.

    TILE is a GeoTIFF (2 bands: S1 VV, VH in dB; 10 or 12 bands: S2) or a BigEarthNet patch folder."""
    from rsretrieve.search import Archive

    if (tile is None) == (patch_id is None):
        raise RSRetrieveError("query: give either a TILE path or --id PATCH_ID (one of them)")
    if tile is not None and not tile.exists():
        raise RSRetrieveError(f"{tile}: no such file or folder")
    if mosaic is not None:
        _check_writable(mosaic)
    ws = State.workspace
    archive = Archive.open(store or ws.selection_store(ws.select(subset=subset, remember=False)), ws, use_gpu=gpu_search)
    if tile is not None:
        result = archive.query_tile(tile, target.value, k, modality.value if modality else None)
    else:
        result = archive.query_id(patch_id, target.value, k, modality.value if modality else None)
    _warn_if_random(result.provenance)
    if fmt is OutputFormat.json:
        print_json(result.to_dict())
    elif fmt is OutputFormat.geojson:
        print_json(result.to_geojson())
    else:
        _print_hits(result)
    if mosaic is not None:
        path = archive.mosaic(result, mosaic)
        err.print(f"mosaic written to {path}")


def _print_hits(result) -> None:
    table = Table(title=f"{result.query_label} → {result.target.upper()} (top {len(result.hits)}, cosine similarity)")
    for column in ("rank", "patch id", "score", "labels", "split", "lat, lon"):
        table.add_column(column, overflow="fold")
    for hit in result.hits:
        location = f"{hit.lat:.4f}, {hit.lon:.4f}" if hit.lat == hit.lat and hit.lat is not None else "-"
        table.add_row(str(hit.rank), hit.patch_id, f"{hit.score:.4f}", "; ".join(hit.labels), hit.split, location)
    console.print(table)


# -- eval ------------------------------------------------------------------------------------------
@app.command("eval")
def evaluate(
    name: Annotated[str, typer.Argument(help="sample | BENv2-14k | BENv2-243k")],
    k: Annotated[Optional[int], typer.Option("--k", "-k", min=1, help="Retrieved per query [default: the set's own, 10 for BENv2, 3 for sample].")] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: s1s1,s2s2,s1s2,s2s1")] = "s1s1,s2s2,s1s2,s2s1",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every figure and the provenance to this JSON file.")] = None,
    data_root: RootOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    batch_size: BatchOpt = None,
    scheduler: SchedulerOpt = None,
) -> None:
    """F1 of the CSMoE paper (Table VI): queries = validation split, archive = test split."""
    import json

    from indexer.jobs import evaluate_subset, needed_modalities
    from rsretrieve.subsets import get_subset

    subset = get_subset(name)
    task_list = tuple(t.strip().lower() for t in tasks.split(",") if t.strip())
    bad = [t for t in task_list if t not in ("s1s1", "s2s2", "s1s2", "s2s1")]
    if bad or not task_list:
        raise RSRetrieveError(f"--tasks: unknown task {bad[0] if bad else tasks!r}; use s1s1, s2s2, s1s2, s2s1")
    if json_out is not None:
        _check_writable(json_out)
    on_sample = subset.name == "sample"
    dataset = DatasetChoice.sample if on_sample else DatasetChoice.benv2
    job = _job(dataset, data_root, None if on_sample else subset.name, model, checkpoint, device, batch_size, scheduler)
    _encode_all(job, needed_modalities(task_list))
    k = k or subset.default_k
    result = evaluate_subset(job, subset.name, task_list, k)
    State.workspace.remember(job.selection)
    data = {**result.to_dict(), "subset": subset.name}
    _print_eval(result, subset.name, k)
    if json_out:
        json_out.write_text(json.dumps(data, indent=2, default=str))
        console.print(f"all figures written to {json_out}")


def _check_writable(path: Path) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    if path.is_dir():
        raise RSRetrieveError(f"{path}: is a folder; give a file name")
    if not path.parent.exists():
        raise RSRetrieveError(f"{path}: folder {path.parent} does not exist")


def _print_eval(result, name: str, k: int) -> None:
    header, *rows = result.table_rows()
    table = Table(title=f"{name}: retrieval at k={k} — tasks laid out as in CSMoE Table VI (query split {result.query_split}, archive {result.archive_split})")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row, style="bold red" if row[0].startswith("!!") else None)
    console.print(table)
    if result.random_init:
        console.print(Panel(RANDOM_INIT_WARNING + "\nThese F1 values only show that the pipeline runs; they are not the model's quality.", border_style="red"))
