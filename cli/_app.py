"""The Typer app, its shared options and helpers; each command lives in a module of its own."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from rsretrieve import __version__
from rsretrieve.errors import RSRetrieveError
from rsretrieve.io.jsontext import dumps as json_text
from rsretrieve.provenance import is_random_init
from rsretrieve.workspace import Workspace

app = typer.Typer(
    name="rsretrieve",
    help="Content-based retrieval of Sentinel-1 / Sentinel-2 patches with CSMoE embeddings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
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


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ComputeChoice(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    ivfpq = "ivfpq"
    hnsw = "hnsw"
    ivfpq_disk = "ivfpq-disk"


class WindowRule(str, Enum):
    majortom = "majortom"
    grid = "grid"


class State:
    workspace: Workspace = Workspace()
    quiet: bool = False  # no progress bars, spinners or notes: results, warnings and errors only
    machine_output: bool = False  # stdout carries JSON (or another format): status lines go to stderr

    @classmethod
    def status_console(cls) -> Console:
        """Where a command's status lines (encode summaries, notes) go: stdout, unless stdout
        carries machine output."""
        return err if cls.machine_output else console


def _version(value: bool) -> None:
    if value:
        console.print(f"rsretrieve {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    workspace: Annotated[
        Optional[Path], typer.Option("--workspace", "-w", envvar="RSRETRIEVE_WORKSPACE", show_envvar=True,
                                     show_default="./rsretrieve-workspace", help="Workspace folder: stores, indexes, remembered choices.")
    ] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-v: info, -vv: debug, Dask's included).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, spinners or notes; results, warnings and errors only.")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    State.workspace = Workspace(workspace)
    State.quiet = quiet
    set_log_level(verbose)


def set_log_level(verbose: int) -> None:
    """rsretrieve's logger: errors only by default, more with -v/-vv. Dask's: nothing below -vv
    (its warnings about ports, event loops and scratch space, and the heartbeat tracebacks of a
    cluster shutting down, are not the user's business; a failed task is reported by rsretrieve)."""
    import logging

    level = {0: logging.ERROR, 1: logging.INFO}.get(verbose, logging.DEBUG)
    if verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rsretrieve").setLevel(level)
    dask_level = "debug" if verbose >= 2 else "critical"
    # `import distributed` sets its loggers from Dask's config (info by default), here and in every
    # worker process: the config says it, through the environment the workers inherit
    os.environ["DASK_LOGGING__DISTRIBUTED"] = dask_level
    if "dask.config" in sys.modules:
        import dask.config

        dask.config.set({"logging.distributed": dask_level})
    for name in ("distributed", "dask", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(dask_level.upper())


def status(message: str):
    """A spinner on stderr while something slow and silent happens (model loading, cluster start);
    nothing with --quiet or when stderr is not a terminal."""
    from contextlib import nullcontext

    return nullcontext() if State.quiet else err.status(message, spinner="dots")


def require_faiss() -> None:
    """Fail before any work when faiss is missing (it ships as an extra: cpu or gpu)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise RSRetrieveError("faiss is not installed: pip install 'rsretrieve[cpu]' (or 'rsretrieve[gpu]' on a CUDA machine)") from None


def print_json(data) -> None:
    """Plain JSON on stdout (no colour codes), for pipes: valid JSON always (null for NaN, `jsontext`)."""
    sys.stdout.write(json_text(data, indent=2) + "\n")


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


def local_store(store: str | None) -> Path | None:
    """--store as a local Path; a URL is refused (stores are written in place: local paths for now)."""
    from rsretrieve.io.remote import is_url

    if store is not None and is_url(store):
        raise RSRetrieveError(f"{store}: --store must be a local path for now (stores given as URLs are not supported)")
    return Path(store) if store is not None else None


def selected_store(store: str | None, subset: str | None = None, windows: WindowRule | None = None) -> Path:
    """The store a reading command uses: --store, else the current selection's (its remembered
    Major TOM windows and filters included). When the workspace holds other stores of the same
    dataset and model, which one was taken is said on stderr."""
    if store is not None:
        return local_store(store)
    ws = State.workspace
    selection = ws.select(subset=subset, remember=False, windows=windows.value if windows else None)
    if windows is not None and selection.dataset != "majortom":
        raise RSRetrieveError(f"--windows {windows.value}: the current dataset is {selection.dataset}; it applies to Major TOM stores only")
    path = ws.selection_store(selection)
    others = ws.sibling_stores(selection)
    if others and not State.quiet:
        options = selection.describe_options() or "the default windows, no filters"
        err.print(f"[yellow]note:[/] using {path.name} ({options}); the workspace also holds "
                  f"{', '.join(p.name for p in others)}: --windows or --store picks another", highlight=False)
    return path


def waiting(who: str) -> None:
    """What a command says while another process holds the store it must write."""
    err.print(f"[yellow]waiting:[/] the store is being written by {who}; this command continues when it is done", highlight=False)


# -- options shared by the commands that encode ---------------------------------------------------
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", metavar="<sample|benv2|majortom|...>", show_default="the current one, else sample",
                                                   help="Dataset to encode: sample, benv2, majortom, or one an installed plugin registers.")]
RootOpt = Annotated[Optional[str], typer.Option("--data-root", help="Dataset root, a folder or (Major TOM) a URL: s3://, gs://, https://, hf://, ...; "
                                                                  "remembered in the workspace after first use.")]
SubsetOpt = Annotated[Optional[str], typer.Option("--subset", help="Named subset, e.g. BENv2-14k or BENv2-243k.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Config name (`rsretrieve models`); with --checkpoint, the config its weights fit.",
                                                 show_default="the current one, else csmoe-p16")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", help="rsretrieve .safetensors or CSMAE Lightning checkpoint.")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="Where the encoder runs.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Patches per model batch.", show_default="32 on a CPU, 512 on a GPU")]
ComputeOpt = Annotated[ComputeChoice, typer.Option("--precision", help="Precision the model computes at (a store keeps its own; "
                                                   "queries follow it). Not --float16, the stored vectors' type.",
                                                   show_default="bfloat16 on a GPU, float32 on a CPU; an existing store's")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model on the encoder workers (GPU: faster after a ~20 s compile).")]
ReadersOpt = Annotated[Optional[int], typer.Option("--readers", min=1, help="Reader processes of the local cluster.", show_default="one per core, less one per GPU")]
SchedulerOpt = Annotated[Optional[str], typer.Option("--scheduler", help="Address of a dask.distributed scheduler, e.g. tcp://10.0.0.5:8786.", show_default="a local cluster")]
WindowsOpt = Annotated[Optional[WindowRule], typer.Option("--windows", help="Major TOM tiles: majortom = its fragmenter (whole cell, 10 x 10 of 120 px), grid = the CSMoE paper's 8 x 8.",
                                                         show_default="majortom")]
DashboardOpt = Annotated[Optional[str], typer.Option("--dashboard", help="Serve the local cluster's Dask dashboard at this address, e.g. :8787 (needs bokeh).",
                                                      show_default="no dashboard")]
CellsOpt = Annotated[Optional[str], typer.Option("--cells", help="Major TOM: only these grid cells, comma-separated (e.g. 539U_97R,540U_97R).")]
BBoxOpt = Annotated[Optional[str], typer.Option("--bbox", help="Major TOM: tiles whose centre lies in MIN_LON,MIN_LAT,MAX_LON,MAX_LAT.")]
DatesOpt = Annotated[Optional[str], typer.Option("--dates", help="Major TOM: tiles taken from START..END (ISO dates, inclusive; START.. or ..END open).")]
MaxNodataOpt = Annotated[Optional[float], typer.Option("--max-nodata", min=0.0, max=1.0, help="Major TOM: tiles with at most this nodata fraction.")]
PrecisionOpt = Annotated[Optional[bool], typer.Option("--float16/--float32", help="Store embeddings as float16 (half the disk) or float32.",
                                                       show_default="float16 from 1 M patches, else float32")]
MaxSkippedOpt = Annotated[Optional[float], typer.Option("--max-skipped", min=0.0, max=1.0, metavar="FRACTION",
                                                        help="Share of the selection's patches that may be unreadable (a known-incomplete "
                                                             "download); more fails the run, on every run. Nodata windows do not count.",
                                                        show_default="0.05")]
StoreOpt = Annotated[Optional[str], typer.Option("--store", help="Embedding store (Zarr) to use.", show_default="one per dataset, subset and model in the workspace")]


def tile_filters(cells: str | None = None, bbox: str | None = None, dates: str | None = None, max_nodata: float | None = None) -> dict:
    """The Major TOM filter options from their command-line spellings (checked by the reader)."""
    out: dict = {}
    if cells:
        out["cells"] = tuple(c.strip() for c in cells.split(",") if c.strip())
    if bbox:
        out["bbox"] = tuple(v.strip() for v in bbox.split(","))
    if dates:
        start, sep, end = dates.partition("..")
        out["dates"] = (start.strip() or None, end.strip() or None) if sep else (dates.strip(), dates.strip())
    if max_nodata is not None:
        out["max_nodata"] = max_nodata
    if out:
        from rsretrieve.datasets.majortom_plan import Filters

        checked = Filters.build(**out)  # a malformed value fails here, in one line naming the option
        out = {k: v for k, v in vars(checked).items() if v is not None}
    return out


def store_dtype(float16: bool | None) -> str | None:
    """`--float16` / `--float32` as a store dtype (None: the default by archive size)."""
    return None if float16 is None else ("float16" if float16 else "float32")


def make_job(dataset, data_root, subset, model, checkpoint, device=DeviceChoice.auto, batch_size=None, scheduler=None, store=None,
             dtype=None, windows=None, compile=False, readers=None, dashboard=None, filters: dict | None = None,
             max_skipped: float | None = None, precision: ComputeChoice = ComputeChoice.auto):
    from rsretrieve.indexer.jobs import Job

    from rsretrieve.io.remote import as_location, is_url

    store = local_store(store)
    if data_root is not None and not is_url(data_root) and not Path(as_location(data_root)).exists():  # file:// too  # a URL: the reader says if it cannot reach it
        raise RSRetrieveError(f"{data_root}: --data-root does not exist")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise RSRetrieveError(f"{checkpoint}: --checkpoint does not exist")
    # remembered only once the command has succeeded: a bad --checkpoint must not become current
    if subset is not None:
        from rsretrieve.datasets.subsets import get_subset

        subset = get_subset(subset).name  # unknown names fail here, with the known ones listed
    if dataset is not None:
        from rsretrieve.datasets import list_datasets

        if dataset.lower() not in list_datasets():
            raise RSRetrieveError(f"--dataset {dataset}: unknown dataset; registered: {', '.join(list_datasets())}")
        dataset = dataset.lower()
    selection = State.workspace.select(dataset, data_root, model, checkpoint, subset, remember=False,
                                       windows=windows.value if windows else None, filters=filters)
    if data_root is not None and selection.dataset == "sample":
        raise RSRetrieveError(f"{data_root}: --data-root needs --dataset benv2 or majortom (the bundled sample has its own)")
    if windows is not None and selection.dataset != "majortom":
        raise RSRetrieveError(f"--windows {windows.value}: applies to --dataset majortom only")
    if dashboard and scheduler:
        raise RSRetrieveError("--dashboard: applies to the local cluster; a --scheduler serves its own dashboard")
    if filters and selection.dataset != "majortom":
        raise RSRetrieveError(f"--{next(iter(filters)).replace('_', '-')}: applies to --dataset majortom only")
    job = Job(State.workspace, selection, store, device.value, batch_size, scheduler, dtype, compile, readers, dashboard,
              precision=precision.value)
    return job if max_skipped is None else replace(job, max_skipped=max_skipped)
