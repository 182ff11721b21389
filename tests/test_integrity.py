"""Stores and indexes never serve wrong results silently (issue 11, findings 1-10): identity,
integrity, atomic writes, concurrent runs, read-only use. Each test fails on the main before it."""

import hashlib
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from rsretrieve.datasets import sample_root
from test_cli import MODEL, assert_clean_error, indexed_workspace, run, sample_patch_folder

S2_ID = sample_patch_folder("s2", 0).name


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workspace with both modalities of the sample encoded and indexed; tests work on copies."""
    return indexed_workspace(tmp_path_factory.mktemp("built"))


@pytest.fixture
def ws(built, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(built, copy)
    return copy


def the_store(ws: Path) -> Path:
    (store,) = (ws / "stores").glob("*.zarr")
    return store


def the_index(ws: Path, modality: str) -> Path:
    (directory,) = (ws / "indexes").glob(f"*/{modality}")
    return directory


# -- 1. an index belongs to its store, not to a file name ------------------------------------------
def test_two_stores_of_one_file_name_never_share_an_index(tmp_path):
    ws = tmp_path / "ws"
    a, b = tmp_path / "A" / "my.zarr", tmp_path / "B" / "my.zarr"
    run(["index", "--modality", "s2", "--model", MODEL, "--store", a], ws)
    majortom = run(["index", "--modality", "s2", "--dataset", "majortom", "--data-root", sample_root() / "majortom", "--store", b], ws)
    assert "index built" in majortom.stdout  # not "up to date" with A's index
    hits = json.loads(run(["query", "--store", b, "--id", _first_id(b, "s2"), "--target", "s2", "-k", "3", "--format", "json"], ws).stdout)
    b_ids = set(xr.open_zarr(b, group="s2")["patch_id"].values.tolist())
    assert {h["patch_id"] for h in hits["results"]} <= b_ids
    assert not b_ids & set(xr.open_zarr(a, group="s2")["patch_id"].values.tolist())


def _first_id(store: Path, modality: str) -> str:
    return str(xr.open_zarr(store, group=modality)["patch_id"].values[0])


# -- 2. a store serves the data it was made from ---------------------------------------------------
def test_a_store_refuses_other_patches_at_another_data_root(tmp_path):
    """Another root holding other patches is other data; the same patches elsewhere (a moved root,
    tests/test_real_data_use.py) are not."""
    import pyarrow.parquet as pq

    ws = tmp_path / "ws"
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(sample_root(), first, ignore=shutil.ignore_patterns("majortom"))
    shutil.copytree(first, second)
    meta = pq.read_table(second / "metadata.parquet")
    pq.write_table(meta.take([*range(1, meta.num_rows), 0]), second / "metadata.parquet")  # the same patches, another order
    run(["encode", "--dataset", "benv2", "--data-root", first, "--modality", "s2", "--model", MODEL], ws)
    proc = run(["encode", "--dataset", "benv2", "--data-root", second, "--modality", "s2"], ws, check=False)
    assert_clean_error(proc, "made from benv2 at", str(first), str(second), "root", "patches_sha256")


def test_the_patch_fingerprint_tells_other_patches_apart():
    from rsretrieve.datasets import Chunk, patches_fingerprint

    a = [Chunk("benv2", "benv2:s2:000000", "s2", "tree", "/r", ("p1", "p2"), -1, 2)]
    b = [Chunk("benv2", "benv2:s2:000000", "s2", "tree", "/r", ("p1", "p3"), -1, 2)]
    c = [Chunk("majortom", "k", "s2", "majortom", "/r/part_1.parquet", (), 3, 64)]
    d = [Chunk("majortom", "k", "s2", "majortom", "/r/part_1.parquet", (), 4, 64)]
    assert patches_fingerprint(a) != patches_fingerprint(b)
    assert patches_fingerprint(c) != patches_fingerprint(d)
    assert patches_fingerprint(a) == patches_fingerprint(list(a))


# -- 3. a damaged index is rebuilt, and a query says so in one line --------------------------------
@pytest.mark.parametrize("damage, named", [("truncate-index", "damaged index: index.faiss is 100 bytes"),
                                           ("flip-ids", "damaged index: ids.parquet does not match its SHA-256"),
                                           ("meta-shape", "index.json: not an rsretrieve index metadata file")])
def test_a_damaged_index_is_named_by_query_and_rebuilt_by_index(ws, damage, named):
    directory = the_index(ws, "s2")
    if damage == "truncate-index":
        path = directory / "index.faiss"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "meta-shape":
        (directory / "index.json").write_text("[]")
    else:  # same size, other bytes: only the checksum notices
        path = directory / "ids.parquet"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    assert_clean_error(run(["query", "--id", S2_ID, "--target", "s2"], ws, check=False), named, "rsretrieve index --modality s2")
    assert "index built" in run(["index", "--modality", "s2"], ws).stdout
    hits = json.loads(run(["query", "--id", S2_ID, "--target", "s2", "-k", "3", "--format", "json"], ws).stdout)
    assert len(hits["results"]) == 3


def test_an_index_is_written_atomically(tmp_path, monkeypatch):
    """A crash while saving leaves the previous index intact (and no half-written folder)."""
    import faiss
    import pyarrow.parquet as pq

    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    directory = tmp_path / "idx"
    EmbeddingIndex.from_vectors(vectors, use_gpu=False).save(directory, store_id="abc")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(OSError):
        EmbeddingIndex.from_vectors(vectors[:20], use_gpu=False).save(directory, store_id="abc")
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    assert EmbeddingIndex.load(directory, store_id="abc", use_gpu=False).ntotal == 50 == faiss.read_index(str(directory / "index.faiss")).ntotal


# -- 4. the store notices when its files disagree with its ledger ----------------------------------
def test_a_lost_valid_chunk_is_named_and_repaired(ws):
    store = the_store(ws)
    for f in (store / "s1" / "valid" / "c").iterdir():
        f.unlink()
    info = run(["info", "--json"], ws).stdout
    s1 = json.loads(info)["stores"][0]["modalities"]["s1"]
    assert s1["complete"] is False and s1["damaged_chunks"] == 1
    proc = run(["verify"], ws, check=False)
    assert proc.returncode == 1 and "sample:s1:000000" in proc.stderr and "rsretrieve encode --modality s1" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = run(["index", "--modality", "s1"], ws).stdout
    assert "encoded 24 patches" in out and "over 24 vectors" in out
    assert run(["verify"], ws).returncode == 0


def test_a_lost_embedding_chunk_is_encoded_again(ws):
    store = the_store(ws)
    shutil.rmtree(store / "s2" / "embedding" / "c")
    assert run(["verify"], ws, check=False).returncode == 1
    assert "encoded 24 patches" in run(["encode", "--modality", "s2"], ws).stdout
    assert bool(np.isfinite(xr.open_zarr(store, group="s2")["embedding"].values).all())
    assert run(["verify"], ws).returncode == 0


def test_a_truncated_embedding_shard_is_named_by_info_and_verify_and_repaired_by_encode(ws):
    """A cut shard (a partial copy): `verify` named it and `encode` said "nothing to do", then
    (once it was seen) zarr's read-before-write of the broken shard stopped the repair."""
    store = the_store(ws)
    clean = np.asarray(xr.open_zarr(store, group="s2")["embedding"].values)
    (shard,) = [p for p in (store / "s2" / "embedding" / "c").rglob("*") if p.is_file()]
    shard.write_bytes(shard.read_bytes()[:2000])
    s2 = json.loads(run(["info", "--json"], ws).stdout)["stores"][0]["modalities"]["s2"]
    assert s2["complete"] is False and s2["damaged_chunks"] == 1
    proc = run(["verify"], ws, check=False)
    assert proc.returncode == 1 and "its index fails its checksum" in proc.stderr and shard.name in proc.stderr
    repaired = run(["encode", "--modality", "s2"], ws).stdout
    assert "repaired the S2 store's damaged embedding" in repaired and "encoded 24 patches" in repaired
    assert run(["verify"], ws).returncode == 0
    np.testing.assert_array_equal(np.asarray(xr.open_zarr(store, group="s2")["embedding"].values), clean)


def test_lost_or_corrupt_metadata_is_one_line_everywhere(ws):
    store = the_store(ws)
    (store / "s2" / "embedding" / "zarr.json").unlink()
    proc = run(["verify"], ws, check=False)
    assert proc.returncode == 1 and "s2/embedding/zarr.json: metadata file is missing" in proc.stderr
    assert run(["query", "--id", S2_ID, "--target", "s2", "-k", "2", "--format", "json"], ws).returncode == 0  # the index serves
    (store / "s1" / "zarr.json").write_text("{not json")
    info = run(["info"], ws, check=False)
    assert info.returncode == 0 and "Traceback" not in info.stderr + info.stdout and "damaged" in info.stdout
    assert_clean_error(run(["encode", "--modality", "s1"], ws, check=False), "s1/zarr.json", "unreadable store metadata")


# -- 5. concurrent runs -----------------------------------------------------------------------------
REMEMBER_LOOP = """
import sys
from rsretrieve.workspace import Selection, Workspace
ws = Workspace(sys.argv[1])
for i in range(60):
    ws.remember(Selection("benv2", f"/data/{sys.argv[2]}{i}", "csmoe-tiny", None))
"""


def test_two_processes_remembering_at_once_never_break_config(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", REMEMBER_LOOP, str(tmp_path), tag], stderr=subprocess.PIPE, text=True) for tag in "ab"]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["datasets"]["benv2"]["root"] in {"/data/a59", "/data/b59"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".config.json.*"))


def test_two_first_index_runs_at_once_both_succeed(tmp_path):
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "rsretrieve", "index", "--modality", "s1", "--model", MODEL]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("encoded 24 patches" in out for out, _ in outs) == 1  # the other waited, then found it done
    assert run(["verify"], tmp_path).returncode == 0


def test_a_second_writer_says_whom_it_waits_for(ws):
    from rsretrieve.io.locks import exclusive

    store = the_store(ws)
    shutil.rmtree(store / "s1" / "embedding" / "c")  # work to do, so the run needs the lock
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(ws), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    with exclusive(store):
        proc = subprocess.Popen([sys.executable, "-m", "rsretrieve", "encode", "--modality", "s1"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
        reader.start()
        seen, deadline = [], time.monotonic() + 300
        while not any("waiting" in line for line in seen) and time.monotonic() < deadline:
            try:  # until it says it waits (a deadline, not a guess at how long start-up takes)
                seen.append(lines.get(timeout=0.1))
            except queue.Empty:
                if proc.poll() is not None:
                    break
        assert any("waiting" in line for line in seen), f"no 'waiting' line (exit code {proc.poll()}): {''.join(seen)}"
        assert proc.poll() is None and not (store / "s1" / "embedding" / "c").exists()  # it waits, writing nothing
    proc.wait(timeout=300)
    reader.join(timeout=60)
    out, errs = proc.stdout.read(), "".join(seen + list(lines.queue))
    assert proc.returncode == 0, errs
    assert f"pid {os.getpid()}" in errs and "waiting" in errs
    assert "encoded 24 patches" in out


def test_the_local_cluster_binds_no_fixed_port():
    from distributed import Client

    from rsretrieve.indexer.cluster import local_cluster

    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        taken.bind(("127.0.0.1", 8787))
        taken.listen()
    except OSError:
        pytest.skip("port 8787 is in use on this machine already")  # the check below needs it held by us
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with local_cluster("cpu", readers=1, small_model=True) as cluster, Client(cluster) as client:
                port = client.scheduler_info().get("services", {}).get("dashboard")
        assert port != 8787
        assert not [w for w in caught if "8787" in str(w.message)]
    finally:
        taken.close()


# -- 6. read-only commands write nothing -----------------------------------------------------------
def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_read_only_commands_on_a_complete_store_write_nothing(ws, tmp_path):
    run(["eval", "sample"], ws)  # remembers nothing new after the first time; settles the config
    before = snapshot(ws)
    for args in (["eval", "sample"], ["index"], ["query", "--id", S2_ID, "--target", "s1"], ["info"], ["verify"], ["encode"]):
        run(args, ws)
        assert snapshot(ws) == before, args


# -- 7. output paths are checked before any work ---------------------------------------------------
@pytest.mark.parametrize("where", ["/sys/f1.json", "{file}/f1.json"])
def test_an_unwritable_eval_output_fails_before_encoding(tmp_path, where):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    proc = run(["eval", "sample", "--output", where.replace("{file}", str(a_file))], tmp_path / "ws", check=False)
    assert not (tmp_path / "ws" / "stores").exists()  # nothing was encoded
    assert "F1" not in proc.stdout
    assert_clean_error(proc, "f1.json: cannot be written")


def test_an_unwritable_mosaic_fails_before_the_query(ws):
    proc = run(["query", "--id", S2_ID, "--target", "s2", "--mosaic", "/sys/mosaic.png"], ws, check=False)
    assert "rank" not in proc.stdout  # no results were printed before the failure
    assert_clean_error(proc, "/sys/mosaic.png: cannot be written")


# -- 9. a workspace config of the wrong shape ------------------------------------------------------
@pytest.mark.parametrize("content", ["[]", '{"current": []}', '{"datasets": {"benv2": "/x"}}', '"text"'])
def test_a_config_of_the_wrong_shape_is_one_line(tmp_path, content):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(content)
    assert_clean_error(run(["info"], tmp_path, check=False), "config.json", "fix or delete it")


# -- review follow-ups: corrupt chunk files, shared workspaces, one lock per store ------------------
def test_a_corrupt_chunk_file_is_damage_not_a_traceback(ws):
    store = the_store(ws)
    (chunk,) = (store / "s2" / "valid" / "c").iterdir()
    chunk.write_bytes(chunk.read_bytes()[:5])  # a truncated shard
    proc = run(["verify"], ws, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "s2/valid: rows 0-23 fail their checksum" in proc.stderr
    info = run(["info"], ws)
    assert "Traceback" not in info.stderr and "damaged" in info.stdout
    repaired = run(["index", "--modality", "s2"], ws).stdout  # encode repairs what verify names (issue 23)
    assert "repaired the S2 store's damaged valid" in repaired and "encoded 24 patches" in repaired
    assert run(["verify"], ws).returncode == 0


def test_config_keeps_its_permissions_for_a_shared_workspace(tmp_path):
    from rsretrieve.workspace import Selection, Workspace

    ws = Workspace(tmp_path)
    ws.remember(Selection("sample", None, "csmoe-tiny", None))
    (tmp_path / "config.json").chmod(0o664)
    ws.remember(Selection("sample", None, "csmoe-p16", None))
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o664


def test_every_path_to_a_store_takes_the_same_lock(tmp_path):
    from rsretrieve.io.locks import lock_path

    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "x.zarr").mkdir()
    (tmp_path / "stores").mkdir()
    (tmp_path / "stores" / "x.zarr").symlink_to(tmp_path / "big" / "x.zarr")
    assert lock_path(tmp_path / "stores" / "x.zarr") == lock_path(tmp_path / "big" / "x.zarr") == lock_path(tmp_path / "stores" / ".." / "big" / "x.zarr")


def test_a_root_from_the_environment_is_normalised_like_data_root(tmp_path, monkeypatch):
    from rsretrieve.workspace import Workspace

    monkeypatch.setenv("RSRETRIEVE_MAJORTOM_ROOT", str(tmp_path) + "/./")
    assert Workspace(tmp_path / "ws").dataset_root("majortom") == str(tmp_path.resolve())


def test_a_save_removes_what_a_killed_save_left_behind(tmp_path):
    import os

    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    directory = tmp_path / "s2"
    (tmp_path / ".s2.dead0001.old").mkdir()
    stale = tmp_path / ".s2.dead0002.partial"
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = tmp_path / ".s2.live0003.partial"  # another save, in progress
    fresh.mkdir()
    EmbeddingIndex.from_vectors(np.eye(4, dtype=np.float32), use_gpu=False).save(directory, store_id="abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s2.live0003.partial", "s2"]


def test_a_query_refuses_an_index_older_than_its_store(ws):
    """Patches added after the index was built (a resumed encode, --retry-skipped) must not be
    silently missing from the answers."""
    import zarr

    valid = zarr.open_group(the_store(ws) / "s2", mode="r+")["valid"]
    flags = valid[:]
    flags[0] = False  # as if the index had been built while this patch was still missing
    valid[:] = flags
    proc = run(["query", "--id", S2_ID, "--target", "s2"], ws, check=False)
    assert_clean_error(proc, "index is stale", "rsretrieve index --modality s2")
