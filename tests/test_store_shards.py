"""The store at scale: sharded arrays, shard-at-a-time writes, fast row reads, a ledger without loops.

Generated data: these properties are about the layout, not the model (the pipeline tests cover
real patches end to end).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zarr

import rsretrieve
from rsretrieve.errors import StoreError
from rsretrieve.store import ChunkSpan, EmbeddingStore
from rsretrieve.store import layout
from rsretrieve.store.integrity import chunks_with_skips, damaged_chunks
from rsretrieve.store.rows import RowReader
from rsretrieve.store.writer import ShardWriter

DIM = 16


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 256 rows (inner chunks of 64) so that a few hundred rows span several files."""
    monkeypatch.setattr(layout, "INNER_ROWS", 64)
    monkeypatch.setattr(layout, "SHARD_BYTES", 256 * DIM * 4)


def make_store(path, n_rows=1000, chunk_rows=37):
    spans = [ChunkSpan(f"c{i:04d}", a, min(a + chunk_rows, n_rows)) for i, a in enumerate(range(0, n_rows, chunk_rows))]
    meta = pa.table({"patch_id": [f"p{i}" for i in range(n_rows)], "lat": [float(i) for i in range(n_rows)],
                     "lon": [None] * n_rows})
    store = EmbeddingStore(path)
    store.create("s2", meta, spans, DIM, {"model": "test", "checkpoint_sha256": "random-init"}, "float32")
    return store, spans


def results(spans, vectors, skip=()):
    for span in spans:
        rows = [r for r in range(span.start, span.stop) if r not in skip]
        yield span, [f"p{r}" for r in rows], vectors[rows], ([1.0] * len(rows), [2.0] * len(rows))


def test_arrays_are_sharded_and_the_embedding_is_uncompressed(tmp_path, small_shards):
    store, _ = make_store(tmp_path / "s.zarr")
    group = store.zarr_group("s2")
    assert group["embedding"].shards == (256, DIM) and group["embedding"].chunks == (64, DIM)
    assert group["valid"].chunks == (256,)
    assert RowReader(tmp_path / "s.zarr" / "s2")._plain == (256, 64)


def test_each_shard_is_written_once_whole_and_chunks_are_done_only_after(tmp_path, small_shards, monkeypatch):
    store, spans = make_store(tmp_path / "s.zarr")
    vectors = np.random.default_rng(0).standard_normal((1000, DIM)).astype(np.float32)
    writes = []
    original = zarr.Array.__setitem__

    def spy(self, selection, value):
        if self.path.endswith("embedding"):
            writes.append((selection[0].start, selection[0].stop) if isinstance(selection, tuple) else (selection.start, selection.stop))
        return original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", spy)
    order = list(results(spans, vectors, skip={5, 600}))
    random.Random(1).shuffle(order)
    with ShardWriter(store, "s2", spans) as writer:
        for i, item in enumerate(order):
            writer.add(*item)
            done = store.ledger("s2")[1]
            # a chunk is done only once every shard holding its rows is written
            written = np.zeros(1000, bool)
            for s, e in writes:
                written[s:e] = True
            for span, flag in zip(spans, done):
                assert not flag or written[span.start : span.stop].all(), f"{span.key} done before its rows were written"
            assert done.sum() < len(spans) or i == len(order) - 1
        assert len(writes) == 4, "each shard is written as soon as its last chunk arrives, not when the writer is left"
    assert sorted(writes) == [(0, 256), (256, 512), (512, 768), (768, 1000)], "one whole write per shard"
    group = store.zarr_group("s2")
    stored, valid = np.asarray(group["embedding"][:]), np.asarray(group["valid"][:])
    assert not valid[5] and not valid[600] and valid.sum() == 998
    np.testing.assert_array_equal(stored[valid], vectors[valid])
    assert np.isnan(stored[[5, 600]]).all()
    assert store.ledger("s2")[1].all() and list(store.chunk_valid("s2")[:2]) == [36, 37]
    # where the plan lacked locations, the reader's are written (both, for the rows it read)
    np.testing.assert_array_equal(np.asarray(group["lon"][:]), np.where(valid, 2.0, np.nan))
    np.testing.assert_array_equal(np.asarray(group["lat"][:]), np.where(valid, 1.0, np.arange(1000.0)))


def test_a_resumed_run_keeps_the_rows_of_earlier_runs_in_a_shared_shard(tmp_path, small_shards):
    store, spans = make_store(tmp_path / "s.zarr")
    vectors = np.random.default_rng(2).standard_normal((1000, DIM)).astype(np.float32)
    first, rest = spans[::2], spans[1::2]
    with ShardWriter(store, "s2", first) as writer:
        for item in results(first, vectors):
            writer.add(*item)
    with ShardWriter(store, "s2", rest) as writer:
        for item in results(rest, vectors):
            writer.add(*item)
    np.testing.assert_array_equal(np.asarray(store.zarr_group("s2")["embedding"][:]), vectors)
    assert store.ledger("s2")[1].all() and not damaged_chunks(store, "s2")


def test_leaving_on_an_exception_writes_what_waits(tmp_path, small_shards):
    store, spans = make_store(tmp_path / "s.zarr")
    vectors = np.ones((1000, DIM), np.float32)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(store, "s2", spans) as writer:
            for item in list(results(spans, vectors))[:3]:
                writer.add(*item)
            raise KeyboardInterrupt
    done = store.ledger("s2")[1]
    assert done[:3].all() and not done[3:].any()
    assert np.asarray(store.zarr_group("s2")["valid"][:]).sum() == 3 * 37


def test_row_reader_reads_any_rows_as_zarr_does(tmp_path, small_shards):
    store, spans = make_store(tmp_path / "s.zarr")
    vectors = np.random.default_rng(3).standard_normal((1000, DIM)).astype(np.float32)
    some = [s for s in spans if s.start < 300 or s.start > 700]
    with ShardWriter(store, "s2", some) as writer:
        for item in results(some, vectors):
            writer.add(*item)
    reader = RowReader(tmp_path / "s.zarr" / "s2")
    rows = np.random.default_rng(4).integers(0, 1000, 500)
    expected = np.asarray(store.zarr_group("s2")["embedding"][:])[rows]
    np.testing.assert_array_equal(reader.read(rows), expected)
    reader._plain = None  # zarr's own path agrees
    np.testing.assert_array_equal(reader.read(rows), expected)
    with pytest.raises(IndexError):
        reader.read(np.array([1000]))


def test_ten_million_rows_of_768_float16_make_under_2000_files():
    names = ["embedding", "valid", "lat", "lon", "patch_id", "pair_id", "grid_cell", "product_id", "timestamp", *layout.ledger([])]
    enc = layout.encoding(10_000_000, 768, "float16", names, 200_000)
    assert set(enc) == set(names)
    files = 0
    for name, spec in enc.items():
        rows = (spec.get("shards") or spec["chunks"])[0]
        files += -(-(10_000_000 if not name.startswith("chunk_") else 200_000) // rows) + 1  # + its zarr.json
    assert files <= 2000, files


COMPREHENSIONS = {"<listcomp>", "<genexpr>", "<setcomp>", "<dictcomp>"}


def loop_lines_run(call):
    """(call(), lines of rsretrieve's own functions it executed in this thread, comprehensions left
    out): counted, not timed, so the check does not depend on the machine's load (the timings are in
    benchmarks/bench_planning.py). A `for` loop over the chunks counts every chunk; a comprehension
    that lists the ledger's spans (`EmbeddingStore.ledger`, the start and stop arrays) does not."""
    package = str(Path(rsretrieve.__file__).resolve().parent)
    count = 0

    def in_package(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return in_package

    def tracer(frame, event, arg):
        code = frame.f_code
        return in_package if code.co_filename.startswith(package) and code.co_name not in COMPREHENSIONS else None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(previous)
    return result, count


def test_the_ledger_checks_take_no_python_loop_per_chunk(tmp_path):
    n_chunks = 200_000
    spans = [ChunkSpan(f"c{i}", i * 5, i * 5 + 5) for i in range(n_chunks)]
    meta = pa.table({"patch_id": [f"p{i}" for i in range(n_chunks * 5)]})
    store = EmbeddingStore(tmp_path / "big.zarr")
    store.create("s2", meta, spans, 4, {"model": "test", "checkpoint_sha256": "random-init"}, "float16")
    group = store.zarr_group("s2", "r+")
    group["chunk_done"][:] = True
    group["chunk_valid"][:] = 5
    group["embedding"][:] = np.zeros((n_chunks * 5, 4), np.float16)
    group["valid"][:] = True
    group["valid"][7] = False
    damaged, lines = loop_lines_run(lambda: damaged_chunks(store, "s2"))
    skips, more = loop_lines_run(lambda: chunks_with_skips(store, "s2"))
    assert lines + more < n_chunks // 10, (lines, more)  # a loop over the chunks runs >= 200,000
    assert damaged == {"c1": "5 patches were encoded, 4 are marked valid (lost `valid` data)"}
    assert skips == ["c1"]


def test_a_group_created_slab_by_slab_equals_one_created_at_once(tmp_path, monkeypatch):
    import xarray as xr

    at_once, _ = make_store(tmp_path / "once.zarr")
    monkeypatch.setattr(layout, "SLAB_ROWS", 100)
    in_slabs, _ = make_store(tmp_path / "slabs.zarr")
    a, b = xr.open_zarr(tmp_path / "once.zarr", group="s2"), xr.open_zarr(tmp_path / "slabs.zarr", group="s2")
    assert a.sizes == b.sizes
    for name in ("patch_id", "lat", "lon", "chunk_key", "chunk_start", "chunk_stop", "chunk_done", "chunk_valid"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert in_slabs.ledger("s2")[0] == at_once.ledger("s2")[0]


def test_a_damaged_shard_is_one_line_naming_it_and_other_shards_still_read(tmp_path, small_shards):
    store, spans = make_store(tmp_path / "s.zarr")
    vectors = np.random.default_rng(5).standard_normal((1000, DIM)).astype(np.float32)
    with ShardWriter(store, "s2", spans) as writer:
        for item in results(spans, vectors):
            writer.add(*item)
    reader = RowReader(tmp_path / "s.zarr" / "s2")
    shard = reader._shard_file(1)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut: the index the shard ends with is gone
    with pytest.raises(StoreError, match=r"embedding.*damaged.*checksum") as caught:
        reader.read(np.array([300]))
    assert str(shard) in str(caught.value) and "\n" not in str(caught.value)
    np.testing.assert_array_equal(reader.read(np.array([3, 900])), vectors[[3, 900]])  # shards 0 and 3 are whole


def test_ids_are_found_a_slab_at_a_time_stopping_when_all_are_found(tmp_path, monkeypatch):
    from rsretrieve.store import read

    store, _ = make_store(tmp_path / "s.zarr")
    monkeypatch.setattr(read, "ID_SLAB", 100)
    array = store.zarr_group("s2")["patch_id"]
    slabs = []

    class Spy:
        shape = array.shape

        def __getitem__(self, key):
            slabs.append(key)
            return array[key]

    assert read.find_rows(Spy(), ["p99", "p100", "p0", "nope", "p0"]) == {"p99": 99, "p100": 100, "p0": 0}
    assert len(slabs) == 10 and all(s.stop - s.start == 100 for s in slabs)  # "nope": every slab, each of 100 ids
    slabs.clear()
    assert read.find_rows(Spy(), ["p250", "p3"]) == {"p250": 250, "p3": 3} and len(slabs) == 3  # stops at the third
    assert store.rows_of("s2", ["p999", "p7"]) == {"p999": 999, "p7": 7}
