"""An index's metadata file (`index.json`) and when an index is current for its store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.provenance import differences

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
FORMAT_VERSION = 1


def jsonable(value: Any) -> Any:
    """JSON round-trip so that tuples/lists and numpy scalars compare equal after save/load."""
    return json.loads(json.dumps(value, default=json_default))


def json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(located(directory, f"no index here ({META_FILE} is missing)")) from None
    except json.JSONDecodeError as exc:
        raise StoreError(located(path, f"unreadable index metadata ({exc})")) from None


def index_is_current(directory: str | Path, store_provenance: dict, n_rows: int, selection: dict | None = None) -> bool:
    """True if `directory` holds a complete index built from embeddings with this provenance, from a
    store group of `n_rows` rows (and, if given, with this selection, compared key by key)."""
    directory = Path(directory)
    if not all((directory / name).exists() for name in (INDEX_FILE, IDS_FILE, META_FILE)):
        return False
    try:
        meta = read_meta(directory)
    except StoreError:
        return False
    if differences(meta.get("provenance"), store_provenance):
        return False
    if int(meta.get("n_store_rows", -1)) != int(n_rows):
        return False
    if selection:
        stored = meta.get("selection") or {}
        if any(jsonable(stored.get(key)) != jsonable(value) for key, value in selection.items()):
            return False
    return True


def index_dir(indexes_dir: str | Path, store_path: str | Path, modality: str) -> Path:
    """Where the index of one store group lives, below a folder of indexes."""
    return Path(indexes_dir) / Path(store_path).stem / modality
