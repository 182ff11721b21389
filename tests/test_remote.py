"""Data read where it lives: a Major TOM root given as a URL, served over HTTP by a server on this
machine that answers Range requests, indexes to the same embeddings as the same shards on disk,
reading the shards by byte ranges."""

from __future__ import annotations

import functools
import os
import pickle
import re
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.errors import DataError, RSRetrieveError
from rsretrieve.io.remote import as_location, is_url

from test_cli import MODEL, assert_clean_error, run

SAMPLE = sample_root()
MAJORTOM = SAMPLE / "majortom"
SHARDS = sorted(MAJORTOM.glob("*/images/*.parquet"))


class Served:
    """What the server answered: (method, path, status, bytes sent) per request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, int, int]] = []
        self.fail_next = 0  # answer this many requests with 503
        self.ignore_range = False  # answer ranged requests with the whole file (200)
        self.in_flight = 0  # requests parsed but not yet logged

    def begin(self):
        with self.lock:
            self.in_flight += 1

    def add(self, *entry):
        with self.lock:
            self.log.append(entry)
            self.in_flight -= 1

    def clear(self, timeout: float = 5.0):
        """Forget what was logged, once the requests already answered are logged too: the server
        logs a request after sending its answer, so the client may be back before the entry is."""
        import time

        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            self.log.clear()

    def to(self, suffix: str) -> list[tuple[str, str, int, int]]:
        with self.lock:
            return [e for e in self.log if e[1].endswith(suffix)]


def settle(served: Served, entries: int, timeout: float = 5.0) -> None:
    """Wait until the server has logged `entries` requests (or the timeout passed)."""
    import time

    deadline = time.monotonic() + timeout
    while len(served.log) < entries and time.monotonic() < deadline:
        time.sleep(0.01)


class RangeHandler(SimpleHTTPRequestHandler):
    """`http.server`'s file handler, plus single byte ranges (206, Content-Range, Accept-Ranges), and
    a count of what it sends."""

    served: Served

    def log_message(self, *args):  # quiet
        pass

    def send_head(self):
        with self.served.lock:
            fail, self.served.fail_next = self.served.fail_next > 0, max(0, self.served.fail_next - 1)
        if fail:
            self.send_error(503, "Service Unavailable")
            return None
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if os.path.isdir(path) or not os.path.isfile(path) or match is None or self.served.ignore_range:
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        if first == "":  # the last N bytes
            start, end = max(0, size - int(last)), size - 1
        else:
            start, end = int(first), min(size - 1, int(last)) if last else size - 1
        if start >= size or end < start:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        data = source.read() if remaining is None else source.read(remaining)
        outputfile.write(data)
        self._sent = len(data)

    def parse_request(self):
        parsed = super().parse_request()
        if parsed:
            self._counted = True
            self.served.begin()
        return parsed

    def handle_one_request(self):
        self._remaining, self._sent, self._status, self._counted = None, 0, 0, False
        super().handle_one_request()
        if self._counted:
            self.served.add(self.command, self.path, self._status, self._sent)

    def send_response(self, code, message=None):
        self._status = code
        super().send_response(code, message)


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # concurrent ranged reads: the default backlog (5) drops connections
    daemon_threads = True


@pytest.fixture(autouse=True)
def chunk_cache(tmp_path, monkeypatch) -> Path:
    """The cache of remote shards' chunk listings, in the test's folder (also for the CLI's processes)."""
    monkeypatch.setenv("RSRETRIEVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def server():
    """(base URL, request log) of an HTTP server on 127.0.0.1 serving the bundled sample."""
    served = Served()
    handler = functools.partial(type("Handler", (RangeHandler,), {"served": served}), directory=str(SAMPLE))
    httpd = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_urls_stay_urls():
    assert as_location("s3://bucket/MajorTOM") == "s3://bucket/MajorTOM"
    assert as_location("simplecache::https://host/x") == "simplecache::https://host/x"
    assert as_location(Path("https://host/MajorTOM")) == "https://host/MajorTOM"  # pathlib ate a slash: mended
    assert as_location("file:///data/MajorTOM") == Path("/data/MajorTOM")
    assert as_location("/data/MajorTOM") == Path("/data/MajorTOM")
    assert is_url("hf://datasets/Major-TOM/Core-S2L2A") and not is_url("rsretrieve/data/sample")


def test_reader_over_http_equals_the_local_reader(server, chunk_cache):
    base, served = server
    local, far = open_dataset("majortom", MAJORTOM), open_dataset("majortom", f"{base}/majortom")
    far = pickle.loads(pickle.dumps(far))  # as a worker gets it
    for modality in ("s1", "s2"):
        chunks_local, chunks_far = local.chunks(modality), far.chunks(modality)
        assert [c.key for c in chunks_far] == [c.key for c in chunks_local]
        assert [c.n_patches for c in chunks_far] == [c.n_patches for c in chunks_local]
        assert far.metadata(modality).equals(local.metadata(modality))
        # listed again by another reader: from the local cache, no tile header fetched
        served.clear()
        again = open_dataset("majortom", f"{base}/majortom")
        assert again.chunks(modality) == chunks_far and again.metadata(modality).equals(local.metadata(modality))
        shard = served.to("images/part_00001.parquet")
        assert sum(e[3] for e in shard) <= 2 * 65536, shard  # the footer only
        assert chunks_far[0].path == f"{base}/majortom/{chunks_local[0].key.split(':')[2]}"
        for i in (0, len(chunks_far) - 1):
            a, b = local.read_chunk(chunks_local[i]), far.read_chunk(pickle.loads(pickle.dumps(chunks_far[i])))
            assert a.patch_ids == b.patch_ids and a.meta.equals(b.meta)
            assert np.array_equal(a.pixels.fine, b.pixels.fine)


def test_ranged_file_reads_exact_ranges_retries_and_copes_without_range_support(server):
    from rsretrieve.io.remote import RangedFile

    base, served = server
    shard = SHARDS[0]
    data = shard.read_bytes()
    f = RangedFile(f"{base}/{shard.relative_to(SAMPLE).as_posix()}")
    assert f.size() == len(data)
    f.seek(1000)
    assert f.read(500) == data[1000:1500] and f.tell() == 1500
    f.seek(-100, 2)
    assert f.read() == data[-100:]
    f.prefetch([(0, 10), (5000, 6000)])
    served.clear()
    f.seek(5100)
    assert f.read(100) == data[5100:5200] and served.log == []  # from the prefetched block
    served.fail_next = 2  # two 503s, then the answer
    f.seek(7)
    assert f.read(3) == data[7:10]  # inside a prefetched block: no request
    f.seek(20000)
    assert f.read(64) == data[20000:20064]
    settle(served, 3)  # the server logs a request after sending it: the client may be back first
    assert [e[2] for e in served.log] == [503, 503, 206]
    served.fail_next = 3  # more 503s than tries: the way to the data failed, and the error says so
    f.seek(40000)
    with pytest.raises(ConnectionError):  # `unreachable`: a Major TOM reader skips it for the next run to read again
        f.read(10)
    served.ignore_range = True
    try:
        f.seek(30000)
        assert f.read(10) == data[30000:30010]  # the whole file came, the range is cut from it
    finally:
        served.ignore_range = False


def test_an_object_store_layout_reads_like_the_disk(tmp_path):
    """fsspec's in-memory file system stands in for s3:// or gs:// (paths without a host part)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in MAJORTOM.rglob("*.parquet"):
        fs.pipe_file(f"/bucket/MajorTOM/{f.relative_to(MAJORTOM).as_posix()}", f.read_bytes())
    local, far = open_dataset("majortom", MAJORTOM), open_dataset("majortom", "memory://bucket/MajorTOM")
    assert far.shards("s1") == ["memory://bucket/MajorTOM/Core-S1RTC/images/part_00001.parquet"]
    chunks = far.chunks("s1")
    assert [c.key for c in chunks] == [c.key for c in local.chunks("s1")]
    assert np.array_equal(far.read_chunk(chunks[1]).pixels.fine, local.read_chunk(local.chunks("s1")[1]).pixels.fine)
    assert open_dataset("majortom", "memory://bucket/MajorTOM/Core-S2L2A").shards("s2") == \
        ["memory://bucket/MajorTOM/Core-S2L2A/images/part_00001.parquet"]
    with pytest.raises(DataError, match="^memory://bucket/nothing: no Core-S2L2A parquet shards found$"):
        open_dataset("majortom", "memory://bucket/nothing").chunks("s2")


def test_shards_named_by_metadata_when_nothing_can_be_listed(server, monkeypatch):
    """A host without index pages (Hugging Face's resolve/ URLs): metadata.parquet names the shards."""
    from rsretrieve.datasets import majortom_remote

    base, _ = server
    monkeypatch.setattr(majortom_remote.remote, "entries", lambda url: [])
    monkeypatch.setattr(majortom_remote.remote, "glob", lambda url, pattern: [])
    assert majortom_remote.find_shards(f"{base}/majortom", "S2L2A") == [f"{base}/majortom/Core-S2L2A/images/part_00001.parquet"]
    assert majortom_remote.find_shards(f"{base}/majortom/Core-S1RTC", "S1RTC") == [f"{base}/majortom/Core-S1RTC/images/part_00001.parquet"]


def test_benv2_and_unknown_protocols_say_so_in_one_line():
    with pytest.raises(RSRetrieveError, match="^benv2: remote roots are not supported yet; copy the data or use Major TOM$"):
        open_dataset("benv2", "https://example.org/BigEarthNet-v2")
    with pytest.raises(DataError, match="^nosuchproto://x/y: not a URL that can be read"):
        open_dataset("majortom", "nosuchproto://x/y")


def _embeddings(store: Path):
    import xarray as xr

    group = xr.open_zarr(store, group="s2")
    return group["embedding"].values, group["patch_id"].values.tolist()


def test_index_from_a_url_equals_index_from_disk(server, tmp_path):
    base, served = server
    url = f"{base}/majortom"
    served.clear()
    common = ["index", "--dataset", "majortom", "--model", MODEL, "--modality", "s2"]
    run([*common, "--data-root", url, "--store", tmp_path / "remote.zarr"], tmp_path / "ws-remote")
    shard_requests = served.to("Core-S2L2A/images/part_00001.parquet")
    served.clear()
    again = run([*common, "--data-root", url, "--store", tmp_path / "remote.zarr"], tmp_path / "ws-remote")
    assert "all 3 chunks already encoded" in again.stdout, again.stdout  # 8 tiles a chunk, planned from metadata.parquet
    second = sum(e[3] for e in served.to("Core-S2L2A/images/part_00001.parquet"))
    run([*common, "--data-root", MAJORTOM, "--store", tmp_path / "local.zarr"], tmp_path / "ws-local")

    emb_far, ids_far = _embeddings(tmp_path / "remote.zarr")
    emb_local, ids_local = _embeddings(tmp_path / "local.zarr")
    assert ids_far == ids_local and len(ids_far) > 0
    assert np.array_equal(emb_far, emb_local)
    from rsretrieve.store import EmbeddingStore

    assert EmbeddingStore(tmp_path / "remote.zarr").provenance("s2")["dataset"]["root"] == url
    assert EmbeddingStore(tmp_path / "local.zarr").provenance("s2")["dataset"]["root"] == str(MAJORTOM.resolve())

    # the shard was read by byte ranges, never downloaded whole
    shard_size = (MAJORTOM / "Core-S2L2A/images/part_00001.parquet").stat().st_size
    gets = [e for e in shard_requests if e[0] == "GET"]
    assert gets and all(status == 206 for _, _, status, _ in gets), gets
    assert max(sent for *_, sent in gets) < shard_size / 4
    sent = sum(sent for *_, sent in gets)
    print(f"\nS2 shard {shard_size} bytes; served {sent} bytes in {len(gets)} ranged GETs "
          f"({len(shard_requests) - len(gets)} HEAD); a second index over the complete store: {second} bytes")
    assert second <= 2 * 65536  # the footer: the chunk listing comes from the local cache


def test_unreachable_url_is_one_line_naming_it(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/majortom"
    proc = run(["index", "--dataset", "majortom", "--data-root", url, "--model", MODEL, "--modality", "s2"], tmp_path, check=False)
    assert_clean_error(proc, url, "cannot be reached")


def test_store_given_as_url_is_refused(tmp_path):
    """Stores are local paths for now: a URL is one line, and no folder named `s3:` appears."""
    import subprocess
    import sys

    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "rsretrieve", "index", "--dataset", "majortom", "--data-root", str(MAJORTOM),
                           "--model", MODEL, "--modality", "s2", "--store", "s3://bucket/store.zarr"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)  # a stray `s3:` folder lands here
    assert not (tmp_path / "s3:").exists()
    assert_clean_error(proc, "s3://bucket/store.zarr", "local path")


def test_a_server_that_never_answers_is_one_line_within_the_timeouts(tmp_path):
    """A server that accepts connections and never answers: each request gives up after
    $RSRETRIEVE_HTTP_TIMEOUT seconds, is retried a bounded number of times, and the run ends in
    one line naming the URL (it waited forever)."""
    import subprocess
    import sys
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the connections; nothing ever reads or answers them
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/majortom"
        env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200", "PYTHONWARNINGS": "ignore",
               "RSRETRIEVE_HTTP_TIMEOUT": "1", "RSRETRIEVE_HTTP_CONNECT_TIMEOUT": "1"}
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "rsretrieve", "index", "--dataset", "majortom", "--data-root", url,
                                   "--model", MODEL, "--modality", "s2"], capture_output=True, text=True, env=env, timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("index over a silent server still waiting after 180 s")
    assert_clean_error(proc, url, "cannot be reached")
    print(f"\nsilent server: one line after {time.monotonic() - start:.1f} s")


def test_remote_timeouts_are_read_from_the_environment(monkeypatch):
    from rsretrieve.io.remote import filesystem, timeouts

    assert timeouts() == (20.0, 10.0)
    monkeypatch.setenv("RSRETRIEVE_HTTP_TIMEOUT", "2.5")
    fs, _ = filesystem("https://example.org/MajorTOM")
    assert fs.client_kwargs["timeout"].sock_read == 2.5 and fs.client_kwargs["timeout"].sock_connect == 10.0
    monkeypatch.setenv("RSRETRIEVE_HTTP_CONNECT_TIMEOUT", "soon")
    with pytest.raises(DataError, match="^RSRETRIEVE_HTTP_CONNECT_TIMEOUT: 'soon' is not a number of seconds above 0$"):
        timeouts()


def test_a_silent_server_is_given_up_after_one_timeout_a_refusing_one_after_three_tries(monkeypatch):
    """Issue 23: a server that never answers ended the run after 3 x (HEAD + GET) read timeouts,
    three minutes with the defaults; a retry only helps a failure that came quickly."""
    import time

    from rsretrieve.io.remote import RETRIES, retried

    monkeypatch.setenv("RSRETRIEVE_HTTP_TIMEOUT", "0.2")
    calls = {"silent": 0, "refused": 0}

    def silent():
        calls["silent"] += 1
        time.sleep(0.25)  # waited its read timeout
        raise TimeoutError("Timeout on reading data from socket")

    def refused():
        calls["refused"] += 1
        raise ConnectionRefusedError(111, "Connect call failed")

    for call in (silent, refused):
        with pytest.raises(OSError):
            retried(call)
    assert calls == {"silent": 1, "refused": RETRIES}


def test_patches_that_could_not_be_reached_are_read_again_by_the_next_run_and_bad_files_are_not(tmp_path, monkeypatch):
    """A server error is the way to the data failing: the next run reads its chunk again by itself.
    A bad file stays skipped until --retry-skipped (before, both stayed skipped)."""
    from distributed import Client, LocalCluster

    import rsretrieve.datasets.majortom_remote as remote_shards
    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
    from rsretrieve.store import EmbeddingStore

    root, store_path = tmp_path / "majortom", tmp_path / "s.zarr"
    shutil.copytree(MAJORTOM, root)
    read, server_down = remote_shards.row_group, {"on": True}

    def flaky(path, meta, rg, columns):
        if rg == 0 and server_down["on"]:
            raise ConnectionError("503 Service Unavailable")  # what RangedFile raises when its retries ran out
        if rg == 1:
            raise OSError("Couldn't deserialize thrift: invalid TType")  # a damaged row group: stays broken
        return read(path, meta, rg, columns)

    monkeypatch.setattr(remote_shards, "row_group", flaky)
    spec, model = DatasetSpec("majortom", str(root)), EncoderSpec("csmoe-tiny", "cpu", 8)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        first = encode(spec, "s2", store_path, model, client=client, max_failed_share=0.5)
        store = EmbeddingStore(store_path)
        assert store.skipped("s2")["by_reason"] == {"row group cannot be reached": 1, "row group unreadable": 1}
        assert len(first.retry) == 1 and list(store.skipped("s2")["retry"]) == list(first.retry)  # the chunk of row groups 0 and 1
        server_down["on"] = False
        second = encode(spec, "s2", store_path, model, client=client, max_failed_share=0.5)
        third = encode(spec, "s2", store_path, model, client=client, max_failed_share=0.5)
    assert any("could not be reached last time are read again" in note for note in second.notes)
    assert second.chunks_encoded == 1 and store.valid_count("s2") == 23
    assert store.skipped("s2")["by_reason"] == {"row group unreadable": 1} and not store.skipped("s2").get("retry")
    assert third.nothing_to_do  # the bad row group is not read again by itself
