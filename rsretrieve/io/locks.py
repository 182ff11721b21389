"""One writer at a time for a store or a workspace file, across processes and machines sharing
a file system that supports `flock`.

    with exclusive(store_path, on_wait=print):   # "held by pid 4242 (rsretrieve encode ...)"
        ...write...

The lock is `<target>.lock` beside the target (filelock: the kernel releases it when its process
dies, so a kill -9 never leaves a stale lock). Its holder writes who it is to `<target>.lock.owner`,
so that a second process can say which one it waits for.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

_HELD: set[tuple[str, int]] = set()  # locks this process holds (a second `exclusive` on one nests, not deadlocks)


def lock_path(target: str | Path) -> Path:
    """`<target>.lock` beside the resolved target: every path to one store (a symlink, `..`) takes
    the same lock."""
    target = Path(target).resolve()
    return target.with_name(target.name + ".lock")


def _owner_file(target: str | Path) -> Path:
    path = lock_path(target)
    return path.with_name(path.name + ".owner")


def owner(target: str | Path) -> str:
    """Who holds the lock of `target`, in words ('pid 4242 on host (`rsretrieve encode`, since ...)')."""
    try:
        info = json.loads(_owner_file(target).read_text())
        return f"pid {info['pid']} on {info['host']} (`{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive(target: str | Path, on_wait: Callable[[str], None] | None = None, timeout: float = -1) -> Iterator[None]:
    """Hold the lock of `target`; if another process holds it, call `on_wait(who)` once and wait
    (at most `timeout` seconds; -1: as long as it takes, then filelock's Timeout)."""
    path = lock_path(target)
    key = (str(path), threading.get_ident())  # nests in one thread; another thread waits for the lock
    if key in _HELD:  # this process holds it already (a job that encodes, then indexes): nest
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(owner(target))
        lock.acquire(timeout=timeout)
    owner_file = _owner_file(target)
    _HELD.add(key)
    try:
        owner_file.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
            "since": dt.datetime.now().isoformat(timespec="seconds"),
        }))
        yield
    finally:
        _HELD.discard(key)
        owner_file.unlink(missing_ok=True)
        lock.release()
