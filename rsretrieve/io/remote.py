"""Data given as URLs: `s3://`, `gs://`, `https://`, `http://`, `hf://`, any fsspec protocol, chained
ones included (`simplecache::s3://...`).

What is a URL (`as_location`), listing under one (`entries`, `glob`), and files read by exact byte
ranges (`RangedFile`): every read is one ranged request for the bytes asked, no read-ahead (fsspec's
default file caches fetch 5 MB (HTTP) to 50 MB (S3) around each read, which would pull a whole small
shard, or far more than a parquet row group), with ranges known up front fetched concurrently
(`RangedFile.prefetch`). Nothing here is pickled: a worker rebuilds it from the URL, a plain string.

Low level: imports nothing of rsretrieve but `errors`; fsspec and its backends load on first use.
"""

from __future__ import annotations

import io
import os
import re
import socket
import time
from pathlib import Path

from rsretrieve.errors import DataError, located

_URL = re.compile(r"^(?:[A-Za-z][\w+.-]*::)*([A-Za-z][\w+.-]*)://")
_COLLAPSED = re.compile(r"^((?:[A-Za-z][\w+.-]*::)*)([A-Za-z][\w+.-]*):/(?!/)")  # what pathlib makes of a URL
LOCAL_PROTOCOLS = ("file", "local")
RETRIES = 3  # attempts of a read that failed on the way (connection, timeout, server error 5xx)
TIMEOUT_ENV, CONNECT_TIMEOUT_ENV = "RSRETRIEVE_HTTP_TIMEOUT", "RSRETRIEVE_HTTP_CONNECT_TIMEOUT"
# seconds: a read waiting on a silent server (an HTTP `info` makes two: HEAD, then GET), a connection
DEFAULT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT = 20.0, 10.0


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def as_location(value: str | os.PathLike) -> str | Path:
    """A URL as a string, unchanged; anything else as a local Path (`file://` URLs included). A URL
    that went through `pathlib.Path` lost a slash (`s3:/bucket/key`): given as a Path, it is read as
    the URL again when its protocol is one fsspec knows and no such local path exists."""
    text = os.fspath(value)
    if not isinstance(value, str):
        m = _COLLAPSED.match(text)
        if m and _known(m.group(2)) and not Path(text).exists():
            text = f"{m.group(1)}{m.group(2)}://{text[m.end():]}"
    m = _URL.match(text)
    if m is None:
        return Path(text)
    if m.group(1).lower() in LOCAL_PROTOCOLS and "::" not in text[: m.start(1)]:
        return Path(text[m.end():] if text[m.end():].startswith("/") else "/" + text[m.end():])
    return text


def is_url(value) -> bool:
    return value is not None and isinstance(as_location(value), str)


def _known(protocol: str) -> bool:
    from fsspec.registry import known_implementations, registry

    return protocol.lower() in known_implementations or protocol.lower() in registry


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise DataError(located(name, f"{text!r} is not a number of seconds above 0"))
    return value


def timeouts() -> tuple[float, float]:
    """(read, connect) timeouts in seconds for every remote request: $RSRETRIEVE_HTTP_TIMEOUT and
    $RSRETRIEVE_HTTP_CONNECT_TIMEOUT, else 20 and 10. A server that accepts and never answers
    fails a read after `read` seconds (retried `RETRIES` times) instead of hanging the run."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT), _seconds(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT)


def _options(protocol: str) -> dict:
    """The timeouts, in the words of the file system that serves `protocol`."""
    read, connect = timeouts()
    protocol = protocol.lower()
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": connect, "read_timeout": read, "retries": {"max_attempts": RETRIES}}}
    if protocol in ("gs", "gcs"):
        return {"requests_timeout": read + connect}
    return {}


def filesystem(url: str):
    """(fsspec file system, path within it) of a URL, its requests bounded by `timeouts()`; a
    one-line DataError when its protocol is unknown or needs a package that is not installed
    (s3fs, gcsfs, huggingface_hub, ...)."""
    import fsspec

    m = _URL.match(url)
    options = _options(m.group(1)) if m else {}
    try:
        return fsspec.core.url_to_fs(url, **({m.group(1): options} if options else {}))
    except ImportError as exc:
        raise DataError(located(url, f"reading this protocol needs a package that is not installed ({one_line(exc)})")) from None
    except ValueError as exc:
        raise DataError(located(url, f"not a URL that can be read ({one_line(exc)})")) from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def relative(url: str, base: str) -> str:
    """`url` relative to `base` when it lies under it, else `url` itself."""
    prefix = base.rstrip("/") + "/"
    return url[len(prefix):] if url.startswith(prefix) else url


def unreachable(exc: BaseException) -> bool:
    """Whether an error (or one it came from) is the way to the data failing rather than the data:
    a refused or failed connection, a timeout, an unknown host, a server error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {c.__name__ for c in type(exc).__mro__}
        if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)) or names & {"ClientConnectionError", "ServerTimeoutError"}:
            return True
        if isinstance(getattr(exc, "status", None), int) and exc.status >= 500:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def reason(exc: BaseException) -> str:
    """One line saying why: the innermost cause that has something to say."""
    messages, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        messages.append(one_line(exc))
        exc = exc.__cause__ or exc.__context__
    return messages[-1] if messages else ""


def retried(call):
    """`call()`, tried again (after 0.5 s, then 1 s, ...) while it fails on the way to the data
    (`unreachable`), at most `RETRIES` times in all, and only while the attempts so far took less
    than one read timeout: a refused connection or a server error is retried, a server that stays
    silent is given up after its first timeout (not `RETRIES` of them). Its last error is raised."""
    spent = 0.0  # in the attempts themselves, not the pauses between them
    for attempt in range(RETRIES):
        started = time.monotonic()
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the callers say what failed in one line
            spent += time.monotonic() - started
            if not unreachable(exc) or attempt == RETRIES - 1 or spent >= timeouts()[0]:
                raise
            time.sleep(0.5 * 2**attempt)


class NotFound(DataError):
    """A URL that names nothing (HTTP 404, no such key)."""


def _failure(url: str, exc: BaseException) -> DataError:
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, FileNotFoundError) and not unreachable(exc):
        return NotFound(located(url, "not found"))
    what = "cannot be reached" if unreachable(exc) else "cannot be read"
    return DataError(located(url, f"{what} ({reason(exc)})"))


def probe(url: str) -> None:
    """A DataError when the place a URL names cannot be reached (host down, refused, timeout) or
    read (no permission, no credentials). A reachable URL that names nothing passes: an HTTP root
    rarely has a page of its own, what lies under it is found by other means."""
    fs, path = filesystem(url)
    try:
        retried(lambda: fs.info(path))
    except Exception as exc:  # noqa: BLE001 - each backend fails in its own way: say which
        if isinstance(exc, FileNotFoundError) and not unreachable(exc):
            return
        raise _failure(url, exc) from None


def _listed(url: str, names: list[str], base: str) -> list[str]:
    return sorted(join(url, relative(n.rstrip("/"), base.rstrip("/"))) for n in names)


def entries(url: str) -> list[str]:
    """URLs of the entries right under `url` (an HTTP server's index page counts); [] when it
    cannot be listed or names nothing, a DataError when it cannot be reached."""
    fs, path = filesystem(url)
    try:
        names = retried(lambda: fs.ls(path, detail=False))
    except Exception as exc:  # noqa: BLE001
        if unreachable(exc):
            raise _failure(url, exc) from None
        return []
    return [u for u in _listed(url, [n for n in names if n.rstrip("/").rsplit("/", 1)[-1] not in ("", "..")], path) if u != url.rstrip("/")]


def glob(url: str, pattern: str) -> list[str]:
    """URLs matching `pattern` (e.g. `images/*.parquet`) under `url`, sorted; [] when there is no
    listing, a DataError when `url` cannot be reached."""
    fs, path = filesystem(url)
    try:
        names = retried(lambda: fs.glob(join(path, pattern)))
    except Exception as exc:  # noqa: BLE001
        if unreachable(exc):
            raise _failure(url, exc) from None
        return []
    return _listed(url, names, path)


_INFO: dict[tuple[str, int], dict] = {}


def info(url: str) -> dict:
    """A file's fsspec info (size, and ETag or Last-Modified where the store says), asked once per process."""
    key = (url, os.getpid())
    if key not in _INFO:
        fs, path = filesystem(url)
        try:
            _INFO[key] = dict(retried(lambda: fs.info(path)))
        except Exception as exc:  # noqa: BLE001
            raise _failure(url, exc) from None
    return _INFO[key]


def file_size(url: str) -> int:
    n = info(url).get("size")
    if n is None:
        raise DataError(located(url, "the server does not say the file's size (needed for ranged reads)"))
    return int(n)


def version(url: str) -> str:
    """What changes when the file does: its size and the store's tag for its content or date."""
    details = {k.lower(): v for k, v in info(url).items()}
    tag = next((str(details[k]) for k in ("etag", "md5", "content-md5", "last-modified", "last_modified", "mtime", "updated")
                if details.get(k)), "")
    return f"{details.get('size')}:{tag}"


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over a URL whose every read is one request for exactly the bytes
    asked (`cat_file(path, start, end)`: an HTTP Range request, an S3/GCS ranged GET). Ranges known
    in advance can be fetched together (`prefetch`, concurrent on async file systems) and are then
    served from memory. One per reader, not shared between threads, never pickled."""

    def __init__(self, url: str, nbytes: int | None = None):
        super().__init__()
        self.url = url
        self.fs, self.path = filesystem(url)
        self.nbytes = file_size(url) if nbytes is None else nbytes
        self.pos = 0
        self.blocks: list[tuple[int, bytes]] = []  # prefetched (start, data)
        self.requests = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.nbytes}[whence] + offset
        return self.pos

    def size(self) -> int:
        return self.nbytes

    def read(self, n: int = -1) -> bytes:
        end = self.nbytes if n is None or n < 0 else min(self.nbytes, self.pos + n)
        if end <= self.pos:
            return b""
        data = next((b[self.pos - s : end - s] for s, b in self.blocks if s <= self.pos and end <= s + len(b)), None)
        if data is None:
            data = self._fetch([(self.pos, end)])[0]
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch these (start, end) byte ranges now, together; later reads inside one are free."""
        ranges = [(max(0, s), min(self.nbytes, e)) for s, e in ranges if e > s]
        if ranges:
            self.blocks += list(zip([s for s, _ in ranges], self._fetch(ranges)))

    def _fetch(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        def fetch():
            if len(ranges) == 1:
                return [self.fs.cat_file(self.path, start=ranges[0][0], end=ranges[0][1])]
            return self.fs.cat_ranges([self.path] * len(ranges), [s for s, _ in ranges], [e for _, e in ranges], on_error="raise")

        try:
            out = retried(fetch)
        except Exception as exc:  # noqa: BLE001 - said in one line; the way failing stays a ConnectionError (`unreachable`)
            if unreachable(exc):
                raise ConnectionError(reason(exc)) from None
            raise OSError("not found" if isinstance(exc, FileNotFoundError) else reason(exc)) from None
        self.requests += len(ranges)
        checked = []
        for (s, e), data in zip(ranges, out):
            if len(data) == self.nbytes and e - s != self.nbytes:
                data = data[s:e]  # a server that ignores Range sends the whole file: correct, but slow
            if len(data) != e - s:
                raise OSError(f"asked for bytes {s}-{e}, got {len(data)} bytes")
            self.bytes_read += len(data)
            checked.append(data)
        return checked
