"""`rsretrieve verify`: name what is wrong with a workspace's stores and indexes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rsretrieve.cli._app import State, app, console, err


@app.command()
def verify(
    store: Annotated[Optional[list[Path]], typer.Option("--store", help="Store(s) to check [default: every store in the workspace].")] = None,
) -> None:
    """Compare each store's ledger with its data (missing chunk files, non-finite rows, unreadable
    metadata) and each index with its recorded sizes and checksums. Exit 1 if anything is wrong.

    `rsretrieve encode` encodes damaged chunks again; `rsretrieve index` rebuilds damaged indexes."""
    from rsretrieve.errors import RSRetrieveError
    from rsretrieve.retrieval.verify import verify_archive

    ws = State.workspace
    stores = list(store or ws.stores())
    if not stores:
        console.print("no stores to verify")
        return
    problems = 0
    for path in stores:
        if not path.exists():
            raise RSRetrieveError(f"{path}: no such store")
        findings = verify_archive(path, ws.indexes_dir)
        problems += len(findings)
        if not findings:
            console.print(f"[green]ok[/]  {path}", highlight=False)
        for finding in findings:
            err.print(f"[bold red]damaged:[/] {finding}", highlight=False, soft_wrap=True)
    if problems:
        err.print(f"{problems} problem(s) found")
        raise typer.Exit(1)
