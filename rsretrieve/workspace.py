"""The workspace: where stores, indexes and the user's remembered choices live.

Default `./rsretrieve-workspace`; `RSRETRIEVE_WORKSPACE` or `--workspace` override it. A small
`config.json` remembers each dataset's root after first use and which dataset and model are current,
so that `index`, `query` and `eval` need no paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from rsretrieve.errors import RSRetrieveError, located
from rsretrieve.io.files import atomic_write
from rsretrieve.io.locks import exclusive

DEFAULT_WORKSPACE = "rsretrieve-workspace"
DEFAULT_MODEL = "csmoe-p16"
DEFAULT_DATASET = "sample"
DEFAULT_WINDOWS = "majortom"  # Major TOM's own fragmenter; "grid" is the CSMoE paper's 8 x 8
ROOT_ENV = {"benv2": "RSRETRIEVE_BENV2_ROOT", "majortom": "RSRETRIEVE_MAJORTOM_ROOT"}


def default_workspace_path() -> Path:
    return Path(os.environ.get("RSRETRIEVE_WORKSPACE", DEFAULT_WORKSPACE)).expanduser()


@dataclass(frozen=True)
class Selection:
    """What later commands act on: a dataset (with its root) and a model (with its checkpoint)."""

    dataset: str
    root: str | None
    model: str
    checkpoint: str | None
    subset: str | None = None  # a named subset (BENv2-14k, BENv2-243k) of the dataset
    config: str | None = None  # the registered config a checkpoint's weights fit (--model with --checkpoint)
    # Major TOM: the window rule ("grid"; None is the fragmenter's, the default) and the tile filters
    # (cells, bbox, dates, max_nodata): another cut or choice of tiles is other patches, a store of its own
    windows: str | None = None
    filters: tuple[tuple[str, object], ...] = ()

    @property
    def reader_options(self) -> tuple[tuple[str, object], ...]:
        """The reader options that make this selection's patches (part of its store's identity)."""
        return ((("windows", self.windows),) if self.windows else ()) + tuple(self.filters)

    def describe_options(self) -> str:
        """'windows grid, cells 539U_97R' ('' for the defaults): what makes its store one of its own."""
        return ", ".join(f"{name.replace('_', ' ')} {_option_text(value)}" for name, value in self.reader_options)

    @property
    def model_spec(self) -> str:
        """What `load_model` takes: the checkpoint path when there is one, else the config name."""
        return self.checkpoint or self.model


class Workspace:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path).expanduser() if path else default_workspace_path()

    # -- layout ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def stores_dir(self) -> Path:
        return self.path / "stores"

    @property
    def indexes_dir(self) -> Path:
        return self.path / "indexes"

    def store_path(self, dataset: str, model: str) -> Path:
        """One store per dataset and model: a second model never writes into the first's store."""
        return self.stores_dir / f"{dataset}--{_slug(model)}.zarr"

    def selection_store(self, selection: Selection) -> Path:
        """The store of a selection: one per dataset, subset, model, window rule and tile filters."""
        path = self.store_path(selection.dataset + (f"-{selection.subset}" if selection.subset else ""), selection.model)
        if selection.windows:
            path = path.with_name(f"{path.stem}-{selection.windows}windows.zarr")
        if selection.filters:
            digest = hashlib.sha256(json.dumps(list(selection.filters), default=str).encode()).hexdigest()[:8]
            path = path.with_name(f"{path.stem}-{'-'.join(name for name, _ in selection.filters)}-{digest}.zarr")
        return path

    def sibling_stores(self, selection: Selection) -> list[Path]:
        """Other stores of the selection's dataset, subset and model (other windows or filters):
        the stores a command without those options could have meant."""
        plain = self.selection_store(Selection(selection.dataset, None, selection.model, None, selection.subset))
        chosen = self.selection_store(selection)
        own = re.compile(re.escape(plain.stem) + r"(-\w+windows)?(-[a-z_-]+-[0-9a-f]{8})?\.zarr")
        return [p for p in self.stores() if p != chosen and own.fullmatch(p.name)]

    def index_dir(self, store_path: Path, modality: str) -> Path:
        """Where the index of one store's group lives: named after the store's identity, not only
        its file name (two stores called `my.zarr` in two folders never share an index)."""
        from rsretrieve.retrieval.index_meta import index_dir
        from rsretrieve.store import EmbeddingStore

        return index_dir(self.indexes_dir, store_path, EmbeddingStore(store_path).store_id, modality)

    def stores(self) -> list[Path]:
        return sorted(self.stores_dir.glob("*.zarr")) if self.stores_dir.exists() else []

    # -- remembered configuration -------------------------------------------------------------
    def load_config(self) -> dict:
        if not self.config_path.exists():
            return {}
        try:
            config = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as exc:
            raise RSRetrieveError(located(self.config_path, f"not valid JSON ({exc.msg}); fix or delete it")) from None
        except UnicodeDecodeError:
            raise RSRetrieveError(located(self.config_path, "not a text file; fix or delete it")) from None
        _check_config_shape(config, self.config_path)
        return config

    def save_config(self, config: dict) -> None:
        """Write config.json atomically, through a temporary file of its own (a second process
        writing at the same moment never shares it), and only if it changes."""
        if self.config_path.exists() and self.load_config() == config:
            return  # a read-only workspace stays usable; nothing is rewritten for nothing
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, json.dumps(config, indent=2, sort_keys=True))

    def dataset_root(self, dataset: str) -> str | None:
        """Root of a dataset: the environment variable wins, then the remembered root."""
        env = ROOT_ENV.get(dataset)
        if env and os.environ.get(env):
            return _normalise_root(os.environ[env])  # as --data-root is: the root is part of a store's identity
        return self.load_config().get("datasets", {}).get(dataset, {}).get("root")

    def select(
        self,
        dataset: str | None = None,
        root: str | Path | None = None,
        model: str | None = None,
        checkpoint: str | Path | None = None,
        subset: str | None = None,
        remember: bool = True,
        windows: str | None = None,
        filters: dict | None = None,
    ) -> Selection:
        """Resolve what to act on from explicit choices, then the remembered ones, then defaults;
        remember explicit choices for the next command.

        The window rule and the tile filters are remembered together, with the dataset they belong
        to: a command that gives any of them gives them all (`--windows majortom` alone is the
        default store again)."""
        config = self.load_config()
        current = config.get("current", {})
        same_dataset = dataset in (None, current.get("dataset"))
        if subset is None and same_dataset:
            subset = current.get("subset")  # the remembered subset belongs to the remembered dataset
        if windows is None and not filters and same_dataset:
            windows, filters = current.get("windows"), dict(current.get("filters") or {})
        windows = None if windows == DEFAULT_WINDOWS else windows
        filters_items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (filters or {}).items()))
        dataset = dataset or current.get("dataset") or DEFAULT_DATASET
        root_str = _normalise_root(root) if root else self.dataset_root(dataset)
        config = None
        if checkpoint:
            checkpoint = str(Path(checkpoint).expanduser().resolve())
            config = model  # with a checkpoint, --model names the config its weights fit
            model = model or Path(checkpoint).stem
        elif model:
            checkpoint = None
        else:
            model = current.get("model") or DEFAULT_MODEL
            checkpoint = current.get("checkpoint")
            config = current.get("config")
        selection = Selection(dataset=dataset, root=root_str, model=model, checkpoint=checkpoint, subset=subset, config=config,
                              windows=windows, filters=filters_items)
        if remember:
            self.remember(selection)
        return selection

    def remember(self, selection: Selection) -> None:
        """Make a selection current (after a command using it succeeded) and keep its root.

        Read, change and write happen under the config's lock, so two commands ending together
        both land (the last one's selection is current) and neither corrupts the file."""
        current = {"dataset": selection.dataset, "subset": selection.subset, "model": selection.model,
                   "checkpoint": selection.checkpoint, "config": selection.config}
        if selection.reader_options:  # absent for the defaults: a config written before them reads the same
            current.update(windows=selection.windows, filters={k: v for k, v in selection.filters})
        current = json.loads(json.dumps(current))  # as config.json holds it: tuples are lists
        if self._remembered(self.load_config(), selection, current):
            return  # nothing changes: no lock, no write (a read-only workspace stays usable)
        with exclusive(self.config_path):
            config = self.load_config()
            if selection.root and selection.dataset != "sample":
                config.setdefault("datasets", {}).setdefault(selection.dataset, {})["root"] = selection.root
            config["current"] = current
            self.save_config(config)

    @staticmethod
    def _remembered(config: dict, selection: Selection, current: dict) -> bool:
        root_known = not selection.root or selection.dataset == "sample" or \
            config.get("datasets", {}).get(selection.dataset, {}).get("root") == selection.root
        return root_known and config.get("current") == current


def _check_config_shape(config, path: Path) -> None:
    """config.json must be {"current": {...}, "datasets": {name: {"root": str}}} (both optional)."""
    problem = None
    if not isinstance(config, dict):
        problem = f"expected a JSON object, found {type(config).__name__}"
    elif not isinstance(config.get("current", {}), dict):
        problem = '"current" is not an object'
    elif not isinstance(config.get("datasets", {}), dict) or not all(isinstance(v, dict) for v in config.get("datasets", {}).values()):
        problem = '"datasets" is not an object of objects'
    if problem:
        raise RSRetrieveError(located(path, f"not an rsretrieve workspace config ({problem}); fix or delete it"))


def _normalise_root(root: str | Path) -> str:
    """A dataset root as remembered: a URL unchanged (s3://, https://, hf://, ...), a local path absolute."""
    from rsretrieve.io.remote import as_location

    location = as_location(root)
    return location if isinstance(location, str) else str(location.expanduser().resolve())


def _option_text(value) -> str:
    return ",".join(str(v) for v in value if v is not None) if isinstance(value, (tuple, list)) else str(value)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
