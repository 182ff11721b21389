"""`rsretrieve query`: search an archive with tiles or archive patches, one or many at once."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from rsretrieve.cli._app import (
    ModalityChoice,
    State,
    StoreOpt,
    SubsetOpt,
    WindowRule,
    app,
    check_writable,
    console,
    err,
    require_faiss,
    selected_store,
    status,
    warn_if_random,
)
from rsretrieve.errors import RSRetrieveError


class QueryFormat(str, Enum):
    table = "table"
    jsonl = "jsonl"
    csv = "csv"
    json = "json"
    geojson = "geojson"
    geoparquet = "geoparquet"


TILES_HELP = ("Query tiles: GeoTIFFs (2 bands S1 VV, VH in dB; 10/12 bands S2), BigEarthNet patch folders, folders of "
              "them (every *.tif and patch folder directly inside), glob patterns, or - to read paths from stdin.")


@app.command()
def query(
    tiles: Annotated[Optional[list[str]], typer.Argument(help=TILES_HELP, show_default=False, metavar="TILE")] = None,
    target: Annotated[ModalityChoice, typer.Option("--target", help="Modality of the archive to search.")] = ModalityChoice.s2,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Results per query.")] = 10,
    k_alias: Annotated[Optional[int], typer.Option("--k", min=1, hidden=True)] = None,
    modality: Annotated[Optional[ModalityChoice], typer.Option("--modality", help="Modality of the query tiles.", show_default="detected")] = None,
    patch_ids: Annotated[Optional[list[str]], typer.Option("--id", metavar="PATCH_ID", help="Query with an archive patch (repeatable).", show_default=False)] = None,
    ids_file: Annotated[Optional[Path], typer.Option("--ids-file", metavar="FILE", help="Query with the archive patches listed in FILE, one id a line (- for stdin).")] = None,
    fmt: Annotated[Optional[QueryFormat], typer.Option("--format", "-f", help="Output format.", show_default="table; with --output, its suffix")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout: one object, or a list for a batch.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", metavar="FILE", help="Write the results to FILE, not the terminal (.jsonl .csv .json .geojson .parquet); - for stdout.")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Table with full ids, every label and lat/lon, as wide as it needs.")] = False,
    mosaic: Annotated[Optional[Path], typer.Option("--mosaic", metavar="PNG", help="PNG of each query beside its results; a batch writes NAME-1.png, NAME-2.png, ...")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", metavar="FILE", help="One self-contained HTML page (no network needed): per query a map of its footprint and its results', "
                                                                         "with their thumbnails, scores and labels.")] = None,
    store: StoreOpt = None,
    subset: SubsetOpt = None,
    windows: Annotated[Optional[WindowRule], typer.Option("--windows", help="Major TOM: search the store of this window rule.",
                                                        show_default="the one the last index used")] = None,
    gpu_search: Annotated[bool, typer.Option("--gpu-search", help="Search through faiss on a GPU when it has one.")] = False,
    unknown_ids: Annotated[Optional[Path], typer.Option("--unknown-ids", metavar="FILE", help="Write every query that failed (an unknown id, a patch skipped when encoding, a bad tile) to FILE, one a line; "
                                                                                    "the terminal shows the first 5 and a count.")] = None,
    max_tile_pixels: Annotated[Optional[int], typer.Option("--max-tile-pixels", min=1, metavar="N", envvar="RSRETRIEVE_MAX_TILE_PIXELS", show_envvar=True,
                                                           help="Refuse a tile declaring more than N pixels (width x height) or a side above 4 x sqrt(N), before reading it.",
                                                           show_default="268435456, twice a full Sentinel-2 tile")] = None,
) -> None:
    """Search an archive with tiles (or archive patches) in the same or the other modality.

    Many queries at once load the model and the index once and search them in one faiss call. In a batch, a tile that cannot be read is named and skipped, the others' results are written, and the command exits 1 at the end, saying how many failed."""
    from rsretrieve.retrieval.inputs import collect_queries

    require_faiss()
    if max_tile_pixels is not None:  # read by the tile readers (`datasets.limits.max_pixels`)
        os.environ["RSRETRIEVE_MAX_TILE_PIXELS"] = str(max_tile_pixels)
    k = k_alias or top_k
    inputs = collect_queries(tiles or [], patch_ids or [], ids_file, sys.stdin)
    to_stdout, to_file = _output_formats(fmt, as_json, output)
    if to_file is not None:
        check_writable(output)
    if mosaic is not None:
        check_writable(_mosaic_path(mosaic, 1, inputs.batch))
    if html is not None:
        check_writable(html)
    if unknown_ids is not None:
        check_writable(unknown_ids)
    keep_pixels = (mosaic is not None and not inputs.batch) or (html is not None and bool(inputs.tiles))  # a tile is not read twice
    store_path = selected_store(store, subset, windows)
    archive, results = _run(inputs, target.value, k, modality.value if modality else None, store_path, gpu_search, keep_pixels=keep_pixels)
    _emit(results, to_stdout, to_file, output, wide, single=not inputs.batch)
    if mosaic is not None:
        _mosaics(archive, results, mosaic, inputs.batch)
    if html is not None and results:
        with status("drawing the map page"):
            archive.map_page(results, html)
        if not State.quiet:
            err.print(f"map page of {len(results)} quer{'ies' if len(results) != 1 else 'y'} written to {html}", highlight=False)
    if inputs.batch and not State.quiet:
        err.print(archive.stats.summary(len(inputs)), highlight=False)
    _fail_if_any(results, len(inputs), unknown_ids)


def _run(inputs, target, k, modality, store_path, gpu_search, keep_pixels):
    from rsretrieve.retrieval.archive import Archive

    archive = Archive.open(store_path, State.workspace.indexes_dir, use_gpu=gpu_search)
    if archive.store.has(target):
        warn_if_random(archive.store.provenance(target))  # before anything can fail: the model it loads is random
    what = f"{len(inputs.tiles)} tile{'s' if len(inputs.tiles) != 1 else ''}" if inputs.tiles else f"{len(inputs.ids)} patch id(s)"
    with status(f"querying with {what}"):
        if inputs.tiles:
            results = archive.query_tiles(inputs.tiles, target, k, modality, skip_bad=inputs.batch, keep_pixels=keep_pixels)
        else:
            results = archive.query_ids(inputs.ids, target, k, modality, skip_bad=inputs.batch, keep_pixels=keep_pixels)
    if results:
        warn_if_random(results[0].provenance)  # before any score is shown
    for note in results.notes if not State.quiet else ():
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    return archive, results


# -- output ---------------------------------------------------------------------------------------
def _output_formats(fmt: QueryFormat | None, as_json: bool, output: Path | None) -> tuple[str | None, str | None]:
    """(format on stdout or None, format of the --output file or None), checked before any work."""
    from rsretrieve.retrieval.results import format_for

    if as_json and fmt not in (None, QueryFormat.json) and (output is None or str(output) == "-"):
        raise RSRetrieveError(f"--json and --format {fmt.value}: both print on stdout; choose one")
    if output is not None and str(output) != "-":
        return ("json" if as_json else None), (fmt.value if fmt else format_for(output))  # a batch's table is long: not twice
    if fmt is QueryFormat.geoparquet and sys.stdout.isatty():
        raise RSRetrieveError("--format geoparquet: binary output; give --output FILE.parquet or redirect stdout")
    return ("json" if as_json else fmt.value if fmt else "table"), None


def _emit(results, to_stdout: str | None, to_file: str | None, output: Path | None, wide: bool, single: bool) -> None:
    from rsretrieve.retrieval.results import results_text, save_results, write_geoparquet

    if not results:
        return
    if to_stdout == "table":
        _print_table(results, wide, console)
    elif to_stdout == "geoparquet":
        sys.stdout.flush()
        write_geoparquet(results, sys.stdout.buffer)
    elif to_stdout is not None:
        sys.stdout.write(results_text(results, to_stdout, single))
    if to_file == "table":
        with output.open("w") as handle:
            _print_table(results, wide, Console(file=handle, width=80, color_system=None))
    elif to_file is not None:
        save_results(results, output, to_file, single)
    if to_file is not None and not State.quiet:
        n = sum(len(r.hits) for r in results)
        err.print(f"{n} results of {len(results)} quer{'ies' if len(results) != 1 else 'y'} written to {output} ({to_file})", highlight=False)


def _print_table(results, wide: bool, out: Console) -> None:
    from rsretrieve.retrieval.results import labels_brief, short_id, short_query

    first = results[0]
    k = max(len(r.hits) for r in results)
    what = first.query_label if len(results) == 1 else f"{len(results)} queries"
    random = " — RANDOM WEIGHTS: not results" if first.random_init else ""
    table = Table(title=f"{what} → {first.target.upper()}, top {k} by cosine similarity{random}", box=box.SIMPLE_HEAD, show_edge=False)
    if wide:
        for name in ("query", "#", "patch id", "score", "labels", "split", "lat", "lon"):
            table.add_column(name, no_wrap=name != "labels", max_width=60 if name == "labels" else None,  # labels wrap, whole
                             justify="right" if name in ("#", "score", "lat", "lon") else "left")
    else:  # fixed columns keep their width; the labels get what is left, cut with an ellipsis
        hits = [h for r in results for h in r.hits]
        widths = {"query": min(_widest("query", [short_query(r) for r in results]), 18), "#": _widest("#", [str(h.rank) for h in hits]),
                  "patch": _widest("patch", [short_id(h.patch_id) for h in hits]), "score": 6, "split": _widest("split", [h.split for h in hits])}
        labels = max(out.width - sum(widths.values()) - 3 * (len(widths) + 1) + 1, 12)  # 2 of padding per column, a rule between
        for name in ("query", "#", "patch", "score", "labels", "split"):
            width = widths.get(name, labels)
            table.add_column(name, no_wrap=True, overflow="ellipsis", width=width,
                             justify="right" if name in ("#", "score") else "left")
    for result in results:
        name = result.source if wide else short_query(result)
        for i, hit in enumerate(result.hits):
            shown = name if i == 0 else ""
            last = i == len(result.hits) - 1
            if wide:
                lat, lon = ("-", "-") if hit.lat is None or hit.lat != hit.lat else (f"{hit.lat:.5f}", f"{hit.lon:.5f}")
                table.add_row(shown, str(hit.rank), hit.patch_id, f"{hit.score:.4f}", "; ".join(hit.labels) or "-", hit.split, lat, lon, end_section=last)
            else:
                table.add_row(shown, str(hit.rank), short_id(hit.patch_id), f"{hit.score:.3f}", labels_brief(hit.labels), hit.split, end_section=last)
    if wide:  # as wide as the table needs, whatever the terminal: --wide is for full ids
        width = Measurement.get(out, out.options.update(width=10_000), table).maximum
        Console(file=out.file, width=width, force_terminal=out.is_terminal, color_system=out.color_system).print(table)
    else:
        out.print(table)


def _widest(header: str, values) -> int:
    return max([len(header), *map(len, values)])


def _mosaic_path(path: Path, n: int, batch: bool) -> Path:
    return path.with_name(f"{path.stem}-{n}{path.suffix}") if batch else path


def _mosaics(archive, results, path: Path, batch: bool) -> None:
    written = [archive.mosaic(result, _mosaic_path(path, n, batch)) for n, result in enumerate(results, start=1)]
    if len(written) == 1:
        err.print(f"mosaic written to {written[0]}", highlight=False)
    elif written:
        err.print(f"{len(written)} mosaics written: {written[0]} ... {written[-1]}, in the order of the results", highlight=False)


SHOWN_FAILURES = 5  # a million unknown ids are a count and the first few, not a million lines


def _fail_if_any(results, n: int, listing: Path | None = None) -> None:
    """A batch goes on past bad tiles and unknown ids; the first few are named here, all of them
    in `listing` when given (written whether or not anything failed), and the exit code says it."""
    from rsretrieve.io.files import atomic_write

    if listing is not None:
        atomic_write(listing, "".join(f"{query}\n" for query, _ in results.failed))
    for _, reason in results.failed[:SHOWN_FAILURES]:
        err.print(f"[yellow]skipped:[/] {reason}", highlight=False, soft_wrap=True)
    if results.failed:
        done = f"the results of the other {len(results)} were written" if results else "no results"
        more = len(results.failed) - SHOWN_FAILURES
        named = ("named above" if more <= 0 else f"the first {SHOWN_FAILURES} named above; "
                 + (f"all in {listing}" if listing is not None else "--unknown-ids FILE lists them all"))
        raise RSRetrieveError(f"{len(results.failed)} of {n} queries failed ({named}); {done}")
