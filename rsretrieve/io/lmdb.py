"""LMDB environments (rico-hdl's BigEarthNet-v2 encoding), read-only, one per process.

LMDB refuses to open one environment twice in a process ("already open in this process"), so every
reader thread of a worker shares the process's one environment, opened on first use and kept; each
thread reads in a transaction of its own. A forked child must not use its parent's environment
(LMDB's rule) and could not open its own while the inherited one is open, so the child closes
what it inherited, at the fork, and opens its own on first use.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rsretrieve.errors import DataError, located

_LOCK = threading.Lock()
_ENVS: dict[tuple[str, int], object] = {}


def _close_inherited() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at the fork would never be released
    for key in [k for k in _ENVS if k[1] != os.getpid()]:
        _ENVS.pop(key).close()


os.register_at_fork(after_in_child=_close_inherited)


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
