"""The `rsretrieve` command line: parses, calls the library, prints."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from rsretrieve import __version__
from rsretrieve.errors import RSRetrieveError
from rsretrieve.workspace import Workspace

app = typer.Typer(
    name="rsretrieve",
    help="Content-based retrieval of Sentinel-1 / Sentinel-2 patches with CSMoE embeddings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)


class ModalityChoice(str, Enum):
    s1 = "s1"
    s2 = "s2"


class ModalityOrBoth(str, Enum):
    s1 = "s1"
    s2 = "s2"
    both = "both"


class DatasetChoice(str, Enum):
    sample = "sample"
    benv2 = "benv2"
    majortom = "majortom"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    ivfpq = "ivfpq"
    hnsw = "hnsw"


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    geojson = "geojson"


class State:
    workspace: Workspace = Workspace()


def _version(value: bool) -> None:
    if value:
        console.print(f"rsretrieve {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    workspace: Annotated[
        Optional[Path], typer.Option("--workspace", "-w", help="Workspace folder [env: RSRETRIEVE_WORKSPACE; default ./rsretrieve-workspace]")
    ] = None,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    State.workspace = Workspace(workspace)


def main() -> None:
    """Entry point: bad input is one line on stderr and exit code 1, never a traceback."""
    import logging
    import warnings

    # the library warns about random weights through warnings/logging; the CLI prints its own banner
    warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
    logging.getLogger("rsretrieve").setLevel(logging.ERROR)
    try:
        app()
    except RSRetrieveError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        err.print(f"[bold red]error:[/] {where}{exc.strerror or exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)


def print_json(data) -> None:
    """Plain JSON on stdout (no colour codes), for pipes."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# the commands register themselves on `app`; imported last because they import from this module
from cli import commands  # noqa: E402,F401
