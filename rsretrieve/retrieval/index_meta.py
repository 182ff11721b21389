"""An index's metadata file (`index.json`), its integrity, and when an index is current for its store.

An index belongs to one store: its folder is named after the store's identity (`store_id`, made
when the store is created), and `index.json` records that id, the store's provenance, and the size
and SHA-256 of `index.faiss` and `ids.parquet`. An index whose files do not match their record, or
that belongs to another store, is never current and never loaded.

Which files an index has depends on its kind: `index.faiss` and `ids.parquet` (faiss id -> store
row, patch id), or for ``ivfpq-disk`` `index.faiss` and `index.ivfdata` (its inverted lists, memory-
mapped; faiss ids are store rows, so there is no id map). Loading checks every file's size, but
hashes only files up to `LOAD_CHECKSUM_MAX_BYTES`: a multi-GB `index.ivfdata` is hashed by
`rsretrieve verify` alone (`damage(..., checksums=True)`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.io.files import sha256_of
from rsretrieve.provenance import differences

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
META_FILE = "index.json"
FORMAT_VERSION = 2  # 2: store_id and file records
IVFDATA_FILE = "index.ivfdata"
DATA_FILES = (INDEX_FILE, IDS_FILE)  # the files of an in-RAM index (flat, hnsw, ivfpq)
ONDISK_FILES = (INDEX_FILE, IVFDATA_FILE)  # the files of an ``ivfpq-disk`` index
LOAD_CHECKSUM_MAX_BYTES = 256 << 20  # hashing costs ~0.2 s per 256 MiB: larger files get a size check on load


def files_of(kind: str | None) -> tuple[str, ...]:
    """The data files an index of this kind is made of (besides index.json)."""
    return ONDISK_FILES if kind == "ivfpq-disk" else DATA_FILES


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
    rebuild = f"run `rsretrieve index --modality {Path(directory).name}` to rebuild the index"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(located(directory, f"no index here ({META_FILE} is missing); {rebuild}")) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreError(located(path, f"unreadable index metadata ({' '.join(str(exc).split())[:120]}); {rebuild}")) from None
    if not isinstance(meta, dict):
        raise StoreError(located(path, f"not an rsretrieve index metadata file (a JSON {type(meta).__name__}); {rebuild}"))
    return meta


def damage(directory: str | Path, meta: dict, checksums: bool | int = True) -> str | None:
    """What is wrong with an index's files against their record in `index.json` (None: nothing).
    Sizes always; SHA-256 of every file with `checksums=True`, of none with False, and with a number
    of the files up to that many bytes (what loading does: `LOAD_CHECKSUM_MAX_BYTES`)."""
    directory = Path(directory)
    records = meta.get("files") or {}
    for name in files_of(meta.get("kind")):
        path, record = directory / name, records.get(name)
        if record is None:
            return f"{name} has no size and checksum in {META_FILE} (written by an older rsretrieve)"
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != record.get("bytes"):
            return f"{name} is {path.stat().st_size} bytes, {META_FILE} says {record.get('bytes')}"
        if _hashed(checksums, record.get("bytes")) and sha256_of(path) != record.get("sha256"):
            return f"{name} does not match its SHA-256 in {META_FILE}"
    return None


def _hashed(checksums: bool | int, size) -> bool:
    if isinstance(checksums, bool):
        return checksums
    return int(size or 0) <= checksums


def index_is_current(directory: str | Path, store_provenance: dict, n_rows: int, selection: dict | None = None,
                     store_id: str | None = None) -> bool:
    """True if `directory` holds an intact index (files matching their record) built from this store
    (`store_id`) and embeddings with this provenance, from a store group of `n_rows` rows (and, if
    given, with this selection, compared key by key)."""
    meta = _intact_meta(directory, store_provenance, store_id)
    if meta is None or int(meta.get("n_store_rows", -1)) != int(n_rows):
        return False
    if selection:
        stored = meta.get("selection") or {}
        if any(jsonable(stored.get(key)) != jsonable(value) for key, value in selection.items()):
            return False
    return True


def growable_meta(directory: str | Path, store_provenance: dict, store_id: str | None = None) -> dict | None:
    """The metadata of an intact index of this store and these embeddings over the whole archive
    (no split, row or pair selection): one that new rows can be added to instead of rebuilding it.
    None otherwise. Whether it covers what the store held when it was built is the caller's check
    (`selection["n_selected"]` against the valid rows below `n_store_rows`)."""
    meta = _intact_meta(directory, store_provenance, store_id)
    if meta is None:
        return None
    selection = meta.get("selection") or {}
    if any(selection.get(key) is not None for key in ("split", "rows", "pair_ids")) or "n_store_rows" not in meta:
        return None
    return meta


def _intact_meta(directory: str | Path, store_provenance: dict, store_id: str | None) -> dict | None:
    """index.json of `directory` if the index is intact (files matching their record) and was built
    from this store (`store_id`, when given) and embeddings with this provenance; else None."""
    directory = Path(directory)
    try:
        meta = read_meta(directory)
    except StoreError:
        return None
    if store_id is not None and meta.get("store_id") != store_id:
        return None
    if damage(directory, meta, checksums=LOAD_CHECKSUM_MAX_BYTES) is not None or differences(meta.get("provenance"), store_provenance):
        return None
    return meta


def index_dir(indexes_dir: str | Path, store_path: str | Path, store_id: str, modality: str) -> Path:
    """Where the index of one store group lives, below a folder of indexes: `<stem>-<id>/<modality>`
    (the stem for people, the store's id so that two stores of one name never share an index)."""
    return Path(indexes_dir) / f"{Path(store_path).stem}-{store_id[:12]}" / modality


def remove_leftovers(directory: Path, stale_after_s: float = 3600) -> None:
    """Folders a killed save or build left beside the index: old copies (always), staging and build
    folders an hour old (a younger one may be another save's, in progress)."""
    import shutil
    import time

    for leftover in directory.parent.glob(f".{directory.name}.*"):
        old = leftover.name.endswith(".old")
        if old or (leftover.name.endswith(".partial") and time.time() - leftover.stat().st_mtime > stale_after_s):
            shutil.rmtree(leftover, ignore_errors=True)


def swap_in(staging: Path, directory: Path) -> None:
    """Put the folder `staging` in place of `directory` by renames (the old one is removed after)."""
    import shutil
    import uuid

    old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
