"""`rsretrieve query`: search an archive with a tile or an archive patch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rsretrieve.cli._app import ModalityChoice, OutputFormat, State, StoreOpt, SubsetOpt, app, check_writable, console, err, print_json, warn_if_random
from rsretrieve.errors import RSRetrieveError


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
    from rsretrieve.retrieval.archive import Archive

    if (tile is None) == (patch_id is None):
        raise RSRetrieveError("query: give either a TILE path or --id PATCH_ID (one of them)")
    if tile is not None and not tile.exists():
        raise RSRetrieveError(f"{tile}: no such file or folder")
    if mosaic is not None:
        check_writable(mosaic)
    ws = State.workspace
    archive = Archive.open(store or ws.selection_store(ws.select(subset=subset, remember=False)), ws.indexes_dir, use_gpu=gpu_search)
    if tile is not None:
        result = archive.query_tile(tile, target.value, k, modality.value if modality else None)
    else:
        result = archive.query_id(patch_id, target.value, k, modality.value if modality else None)
    warn_if_random(result.provenance)
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
