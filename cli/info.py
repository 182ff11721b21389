"""`rsretrieve info` and `rsretrieve models`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from rsretrieve.cli._app import State, app, console, print_json
from rsretrieve.provenance import describe_dataset, describe_preprocessing, describe_weights


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
        "current": {"dataset": selection.dataset, "subset": selection.subset, "root": selection.root, "model": selection.model,
                    "checkpoint": selection.checkpoint, "windows": selection.windows, "filters": dict(selection.filters),
                    "store": str(ws.selection_store(selection))},
        "datasets": ws.load_config().get("datasets", {}),
        "stores": stores,
    }
    if as_json:
        print_json(data)
        return
    console.print(f"[bold]workspace[/] {data['workspace']}" + ("" if ws.path.exists() else " [dim](not created yet)[/]"))
    options = f" ({selection.describe_options()})" if selection.reader_options else ""
    console.print(f"[bold]current[/]   dataset [cyan]{selection.dataset}{' / ' + selection.subset if selection.subset else ''}[/]{options} "
                  f"model [cyan]{selection.model}[/]" + (f" checkpoint {selection.checkpoint}" if selection.checkpoint else ""), highlight=False)
    console.print(f"[bold]store[/]     {ws.selection_store(selection).name} [dim](what query and eval use)[/]", highlight=False)
    if not stores:
        console.print("[dim]no embedding stores yet: run `rsretrieve index --modality s1`[/]")
        return
    for store in stores:
        # the store's name whole, on a line of its own: it is what `--store` and `verify` take
        console.print(f"[bold]store[/] {Path(store['path']).name}\n[dim]in {Path(store['path']).parent}[/]", highlight=False)
        console.print(_store_table(store))
        for modality, row in store["modalities"].items():
            if "error" in row:
                console.print(f"  {modality}: [red]{row['error']}[/]", highlight=False)
                continue
            console.print(f"  {modality}: {describe_weights(row['model'], row['source'])}; "
                          f"preprocessing {describe_preprocessing(row['preprocessing'])}; made from {describe_dataset(row['dataset'])}",
                          highlight=False)
    if any(row.get("error") or row.get("damaged_chunks") for store in stores for row in store["modalities"].values()):
        console.print("[yellow]some stores are damaged:[/] `rsretrieve verify` names what is wrong; `rsretrieve encode` repairs chunks")


def _store_table(store: dict) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("modality", "encoded / patches", "complete", "model", "weights"):
        table.add_column(column, no_wrap=column != "complete")
    for modality, row in store["modalities"].items():
        if "error" in row:
            table.add_row(modality, "-", "[red]damaged[/]", "-", "-")
            continue
        weights = "[red]random-init[/]" if row["random_init"] else str(row["checkpoint_sha256"])[:12]
        complete = "yes" if row["complete"] else f"[red]no: {row['damaged_chunks']} damaged[/]" if row["damaged_chunks"] else "no"
        table.add_row(modality, f"{row['encoded']} / {row['patches']}", complete, str(row["model"]), weights)
    return table


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Registered model configs with parameters and MACs per image, beside the paper's Table IV."""
    from rsretrieve.models.macs import TABLE_IV, model_report
    from rsretrieve.models.registry import list_models

    rows = model_report() + model_report([name for name in list_models() if name not in TABLE_IV])
    if as_json:
        print_json(rows)
        return
    table = Table(title="Configs beside the paper's Table IV (S2 path, per image; Δ vs Table IV)")
    for column in ("model", "params", "MACs fvcore", "paper conv.²", "Table IV"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)

    def ours(value, deviation, unit, scale):
        text = f"{value / scale:.{1 if unit == 'M' else 2}f}{unit}"
        return text if deviation is None else f"{text} {deviation * 100:+.1f}%"

    for r in rows:
        deviations = r.get("deviations") or {}
        one_path = r.get("params_basis") == "s2-path"  # CSMAE's 87M is one ViT-B path
        params = r["params_s2_path"] if one_path else r["params"]
        table.add_row(
            r["name"],
            ours(params, deviations.get("params"), "M", 1e6) + ("¹" if one_path else ""),
            ours(r["macs_s2"], deviations.get("macs"), "B", 1e9),
            ours(r["macs_s2_paper_convention"], deviations.get("macs_paper_convention"), "B", 1e9),
            f"{r['paper_params'] / 1e6:.0f}M {r['paper_macs'] / 1e9:.2f}B" if r.get("paper_macs") else "not in it",
        )
    console.print(table)
    console.print("[dim]¹ one modality path, as the paper counts CSMAE; CSMoE counts both modality encoders.[/]")
    console.print("[dim]² fvcore without the attention matrix products: reproduces the paper's Table I exactly.[/]")
    console.print("[dim]csmoe-tiny, csmae-tiny: small configs for tests and demos, not in the paper.[/]")
    console.print("[dim]C2C (params/MACs) and the S1 path: rsretrieve models --json[/]")
    console.print("[dim]Structure and residuals: docs/MODELS.md[/]")
