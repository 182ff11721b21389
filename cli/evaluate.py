"""`rsretrieve eval`: the CSMoE paper's F1 evaluation (Table VI) on a named subset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.panel import Panel
from rich.table import Table

from rsretrieve.cli._app import (
    RANDOM_INIT_WARNING,
    BatchOpt,
    CheckpointOpt,
    DeviceChoice,
    DeviceOpt,
    MaxSkippedOpt,
    ModelOpt,
    RootOpt,
    SchedulerOpt,
    State,
    app,
    check_writable,
    console,
    err,
    make_job,
    print_json,
    require_faiss,
)
from rsretrieve.cli.encode import encode_all
from rsretrieve.errors import RSRetrieveError


@app.command("eval")
def evaluate(
    name: Annotated[str, typer.Argument(help="sample | BENv2-14k | BENv2-243k")],
    k: Annotated[Optional[int], typer.Option("--top-k", "-k", min=1, help="Retrieved per query.", show_default="the set's own: 10 for BENv2, 3 for sample")] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Comma-separated: s1s1,s2s2,s1s2,s2s1")] = "s1s1,s2s2,s1s2,s2s1",
    as_json: Annotated[bool, typer.Option("--json", help="Print every figure and the provenance as JSON on stdout (no table).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write every figure and the provenance to this JSON file (- for stdout).")] = None,
    data_root: RootOpt = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    device: DeviceOpt = DeviceChoice.auto,
    batch_size: BatchOpt = None,
    scheduler: SchedulerOpt = None,
    max_skipped: MaxSkippedOpt = None,
) -> None:
    """F1 of the CSMoE paper (Table VI): queries = validation split, archive = test split."""
    from rsretrieve.indexer.jobs import evaluate_subset, needed_modalities
    from rsretrieve.io.jsontext import dumps as json_text
    from rsretrieve.datasets.subsets import get_subset

    require_faiss()  # before any encoding
    subset = get_subset(name)
    task_list = tuple(t.strip().lower() for t in tasks.split(",") if t.strip())
    bad = [t for t in task_list if t not in ("s1s1", "s2s2", "s1s2", "s2s1")]
    if bad or not task_list:
        raise RSRetrieveError(f"--tasks: unknown task {bad[0] if bad else tasks!r}; use s1s1, s2s2, s1s2, s2s1")
    to_stdout = as_json or str(output) == "-"
    State.machine_output = to_stdout
    if output is not None and str(output) != "-":
        check_writable(output)
    on_sample = subset.name == "sample"
    dataset = "sample" if on_sample else "benv2"
    job = make_job(dataset, data_root, None if on_sample else subset.name, model, checkpoint, device, batch_size, scheduler,
                   max_skipped=max_skipped)
    encode_all(job, needed_modalities(task_list))
    k = k or subset.default_k
    result = evaluate_subset(job, subset.name, task_list, k)
    State.workspace.remember(job.selection)
    data = {**result.to_dict(), "subset": subset.name}
    if to_stdout:
        print_json(data)
        if result.random_init:
            err.print(RANDOM_INIT_WARNING)
    else:
        _print_eval(result, subset.name, k)
    if output is not None and str(output) != "-":
        output.write_text(json_text(data, indent=2))
        err.print(f"all figures written to {output}")


def _print_eval(result, name: str, k: int) -> None:
    header, *rows = result.table_rows()
    table = Table(title=f"{name}: retrieval at k={k} — tasks laid out as in CSMoE Table VI (query split {result.query_split}, archive {result.archive_split})")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row, style="bold red" if row[0].startswith("!!") else None)
    console.print(table)
    trivial = [t.upper() for t, r in result.tasks.items() if r.map_uninformative]
    if trivial:
        console.print(f"[yellow]note:[/] in {', '.join(trivial)} every archive patch shares a label with every query, "
                      f"so mAP@{k} is 100 % for any ranking there: it says nothing about the model.", highlight=False)
    if result.random_init:
        console.print(Panel(RANDOM_INIT_WARNING + "\nThese F1 values only show that the pipeline runs; they are not the model's quality.", border_style="red"))
