"""LMDB environments (rico-hdl's BigEarthNet-v2 encoding), read-only, one per process.

LMDB refuses to open one environment twice in a process ("already open in this process"), so every
reader thread of a worker shares the process's one environment, opened on first use and kept; each
thread reads in a transaction of its own. The cache is keyed by process id, so a forked worker
opens its own instead of using its parent's.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rsretrieve.errors import DataError, located

_LOCK = threading.Lock()
_ENVS: dict[tuple[str, int], object] = {}


def open_env(path: Path):
    """The process's read-only environment for the LMDB folder `path` (opened once, never closed)."""
    import lmdb

    key = (str(Path(path).resolve()), os.getpid())
    with _LOCK:
        if key not in _ENVS:
            try:
                _ENVS[key] = lmdb.open(key[0], readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
            except lmdb.Error as e:
                raise DataError(located(path, f"cannot open LMDB ({' '.join(str(e).split())})")) from None
        return _ENVS[key]


def get(path: Path, key: str) -> bytes | None:
    """One value, in a read transaction of the calling thread."""
    with open_env(path).begin(buffers=False) as txn:
        return txn.get(key.encode())
