"""`rsretrieve export`: a store's embeddings as one GeoParquet file (Major TOM's embedding layout)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rsretrieve.cli._app import ModalityOrBoth, State, app, check_writable, err, selected_store, warn_if_random
from rsretrieve.errors import RSRetrieveError, StoreError, located


class ExportFormat(str, Enum):
    geoparquet = "geoparquet"


STORE_HELP = "The store (default: the current dataset and model's); a single path is OUT."
OUT_HELP = "The file to write."


@app.command()
def export(
    first: Annotated[Path, typer.Argument(help=STORE_HELP, metavar="[STORE]", show_default=False)],
    second: Annotated[Optional[Path], typer.Argument(help=OUT_HELP, metavar="OUT", show_default=False)] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="Output format.")] = ExportFormat.geoparquet,
    modality: Annotated[Optional[ModalityOrBoth], typer.Option("--modality", help="Group(s) to export, one file.",
                                                               show_default="every group the store has")] = None,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Store rows read at a time (a row group each).")] = 65_536,
) -> None:
    """Write a store's encoded patches to one GeoParquet file: Major TOM's embedding columns
    (unique_id, embedding, timestamp, product_id, grid_cell, geometry = the patch footprint in WGS84,
    centre_lat/lon, utm_footprint, utm_crs, pixel_bbox, ...) plus patch_id, pair_id, modality,
    labels, split, country; the model's provenance in the file metadata. Embeddings as stored (not
    L2-normalised). Reads with geopandas.read_parquet and DuckDB."""
    from rsretrieve.export.geoparquet import export_geoparquet

    out = second if second is not None else first
    check_writable(out)  # before any work
    store = first if second is not None else selected_store(None)  # says which, when the workspace holds others
    if not store.exists():
        hint = "" if second is not None else "; run `rsretrieve index`, or name a store"
        raise StoreError(located(store, f"no such store{hint}"))
    if store.resolve() == out.resolve():
        raise RSRetrieveError(located(out, "is the store itself; give another file"))
    modalities = None if modality is None else modality.value
    _refuse_damaged(store, modalities)

    columns = (TextColumn("[bold]export[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False, disable=State.quiet) as progress:
        task = progress.add_task("export", total=None)
        summary = export_geoparquet(store, out, modalities, batch_rows,
                                    on_start=lambda total: progress.update(task, total=total),
                                    on_rows=lambda rows: progress.advance(task, rows))
    warn_if_random(summary.provenance)
    console = State.status_console()
    by = ", ".join(f"{m.upper()} {n}" for m, n in summary.rows_by_modality.items())
    console.print(f"wrote {summary.rows} rows ({by}) to {out}: {_size(summary.bytes)} ({fmt.value})", highlight=False, soft_wrap=True)
    if State.quiet:
        return
    for m, n in summary.not_encoded.items():
        if n:
            console.print(f"[yellow]note:[/] {n} {m.upper()} patches of the store are not encoded (or were skipped); "
                          "they are not in the file", highlight=False)
    if summary.unlocated:
        console.print(f"[yellow]note:[/] {summary.unlocated} rows have no location: null geometry", highlight=False)


def _refuse_damaged(store: Path, modality: str | None) -> None:
    """A store whose ledger and data disagree (lost chunk files) is refused with one line, as `index` does."""
    from rsretrieve.store import EmbeddingStore
    from rsretrieve.store.integrity import damaged_chunks

    opened = EmbeddingStore(store)
    wanted = opened.modalities() if modality in (None, "both") else [modality]
    for m in wanted:
        if not opened.has(m):
            continue  # the export names what is missing
        damaged = damaged_chunks(opened, m)
        if damaged:
            key, problem = next(iter(damaged.items()))
            raise StoreError(located(store / m, f"{len(damaged)} damaged chunk(s), e.g. {key}: {problem}; "
                                                "`rsretrieve verify` names them, `rsretrieve encode` repairs them"))


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
