"""LMDB environments (rico-hdl's BigEarthNet-v2 encoding), opened read-only."""

from __future__ import annotations

from pathlib import Path

from rsretrieve.errors import DataError, located


def open_env(path: Path):
    """A read-only LMDB environment. Opened per chunk and closed after it (never kept open, so a
    forked worker process never inherits an open environment)."""
    import lmdb

    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True, max_readers=512)
    except lmdb.Error as e:
        raise DataError(located(path, f"cannot open LMDB ({' '.join(str(e).split())})")) from None
