"""The Typer app, its shared options and helpers; each command lives in a module of its own."""

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
from rsretrieve.provenance import is_random_init
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


def print_json(data) -> None:
    """Plain JSON on stdout (no colour codes), for pipes."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


RANDOM_INIT_WARNING = (
    "[bold white on red] RANDOM WEIGHTS [/] the model has no trained checkpoint: embeddings, neighbours and "
    "scores are NOT meaningful results. Pass --checkpoint with real CSMoE/CSMAE weights."
)


_warned: set[str] = set()


def warn_if_random(provenance: dict) -> None:
    """The random-weights banner, once per command."""
    if is_random_init(provenance) and "random" not in _warned:
        _warned.add("random")
        err.print(RANDOM_INIT_WARNING)


def modalities_of(choice: ModalityOrBoth) -> list[str]:
    return ["s1", "s2"] if choice is ModalityOrBoth.both else [choice.value]


def check_writable(path: Path) -> None:
    """Fail before the work, not after it, when an output file cannot be written."""
    from rsretrieve.io.files import probe_writable

    if path.is_dir():
        raise RSRetrieveError(f"{path}: is a folder; give a file name")
    if not path.parent.exists():
        raise RSRetrieveError(f"{path}: folder {path.parent} does not exist")
    try:
        probe_writable(path)
    except OSError as exc:
        raise RSRetrieveError(f"{path}: cannot be written ({exc.strerror or exc})") from None


def waiting(who: str) -> None:
    """What a command says while another process holds the store it must write."""
    err.print(f"[yellow]waiting:[/] the store is being written by {who}; this command continues when it is done", highlight=False)


# -- options shared by the commands that encode ---------------------------------------------------
DatasetOpt = Annotated[Optional[DatasetChoice], typer.Option("--dataset", help="sample | benv2 | majortom [default: the current one, else sample]")]
RootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Dataset root; remembered in the workspace after first use.")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="Named subset, e.g. BENv2-14k or BENv2-243k.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Config name [default: current, else csmoe-p16].")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="rsretrieve .safetensors or CSMAE Lightning checkpoint.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the encoder runs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Patches per model batch (default: 32 on CPU, 512 on a GPU).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model on the encoder workers (GPU: faster after a ~20 s compile).")]
ReadersOpt = Annotated[Optional[int], typer.Option("--readers", min=1, help="Reader processes of the local cluster (default: one per core, less one per GPU).")]
SchedulerOpt = Annotated[Optional[str], typer.Option("--scheduler", help="Address of a dask.distributed scheduler [default: a local cluster].")]
class WindowRule(str, Enum):
    majortom = "majortom"
    grid = "grid"


WindowsOpt = Annotated[Optional[WindowRule], typer.Option("--windows", help="Major TOM tiles: majortom = its fragmenter (whole cell, 10 x 10 of 120 px), grid = the CSMoE paper's 8 x 8; default majortom.")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Store path [default: one per dataset, subset and model in the workspace].")]


def make_job(dataset, data_root, subset, model, checkpoint, device=DeviceChoice.auto, batch_size=None, scheduler=None, store=None,
             dtype=None, windows=None, compile=False, readers=None):
    from rsretrieve.indexer.jobs import Job

    if data_root is not None and not Path(data_root).exists():
        raise RSRetrieveError(f"{data_root}: --data-root does not exist")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise RSRetrieveError(f"{checkpoint}: --checkpoint does not exist")
    # remembered only once the command has succeeded: a bad --checkpoint must not become current
    if subset is not None:
        from rsretrieve.datasets.subsets import get_subset

        subset = get_subset(subset).name  # unknown names fail here, with the known ones listed
    selection = State.workspace.select(dataset.value if dataset else None, data_root, model, checkpoint, subset, remember=False)
    if data_root is not None and selection.dataset == "sample":
        raise RSRetrieveError(f"{data_root}: --data-root needs --dataset benv2 or majortom (the bundled sample has its own)")
    if windows is not None and selection.dataset != "majortom":
        raise RSRetrieveError(f"--windows {windows.value}: applies to --dataset majortom only")
    return Job(State.workspace, selection, store, device.value, batch_size, scheduler, dtype, windows.value if windows else None,
               compile, readers)
