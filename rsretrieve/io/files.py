"""Writing files so that a crash, a full disk or a second process never leaves half of one.

Every write goes to a temporary file with a unique name in the same folder (two processes writing
the same file never share one) and is renamed over the target, which POSIX makes atomic: a reader
sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` through a uniquely named temporary file and an atomic rename."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))  # mkstemp makes it 0600: a shared workspace must stay readable
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The file's present mode, or what a plain open() would give a new one (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def sha256_of(path: str | Path, block: int = 1 << 22) -> str:
    """The SHA-256 of a file, read in blocks (index files reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a file: what a metadata file records to notice a damaged one."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_of(path)}


def files_version(paths) -> tuple:
    """(path, size, mtime) of each file that exists: changes when any is added, removed or rewritten."""
    out = []
    for path in paths:
        try:
            stat = Path(path).stat()
        except OSError:
            continue
        out.append((str(path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


def probe_writable(path: str | Path) -> None:
    """Raise the OSError that writing `path` would raise (a missing or unwritable folder, a file
    where a folder should be), without touching `path` itself."""
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".probe")
    os.close(fd)
    os.unlink(tmp)
