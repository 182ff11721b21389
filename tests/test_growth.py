"""An archive grows: a second Major TOM shard is indexed into an existing store and index.

The bundled Major TOM sample (real BigEarthNet patches in Core parquet shards) is split in two
shards; the first is encoded and indexed, then the second is added. Only the new tiles are
encoded, the old rows are left as they were, the index answers over both, and a query whose hits
are old patches gets the same answer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr

from rsretrieve.errors import StoreError
from rsretrieve.indexer.jobs import grow_index
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
from rsretrieve.retrieval.faiss_index import EmbeddingIndex
from rsretrieve.store import EmbeddingStore

SAMPLE = Path(__file__).resolve().parents[1] / "rsretrieve" / "data" / "sample" / "majortom"
COLLECTIONS = ("Core-S2L2A", "Core-S1RTC")
MODEL = EncoderSpec("csmoe-tiny", "cpu", 8)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, resources={"encoder": 1}, processes=False, dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


def split_sample(root: Path, with_second: bool, metadata: bool = False) -> None:
    """The sample's shard cut in two (one tile per row group, as Major TOM's shards are); with
    `metadata`, the collection's metadata.parquet lists the tiles of the shards present."""
    for collection in COLLECTIONS:
        images = root / collection / "images"
        images.mkdir(parents=True, exist_ok=True)
        table = pq.read_table(SAMPLE / collection / "images" / "part_00001.parquet")
        half = table.num_rows // 2
        pq.write_table(table.slice(0, half), images / "part_00001.parquet", row_group_size=1)
        if with_second:
            pq.write_table(table.slice(half), images / "part_00002.parquet", row_group_size=1)
        if metadata:
            meta = pq.read_table(SAMPLE / collection / "metadata.parquet").to_pylist()
            for row in meta:
                if row["parquet_row"] >= half:
                    row["parquet_url"], row["parquet_row"] = "images/part_00002.parquet", row["parquet_row"] - half
            kept = [row for row in meta if with_second or row["parquet_url"].endswith("part_00001.parquet")]
            pq.write_table(pa.Table.from_pylist(kept), root / collection / "metadata.parquet")


class RecordReads:
    """Read hook: appends each chunk key a reader is asked for to a file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, chunk) -> None:
        with open(self.path, "a") as f:
            f.write(chunk.key + "\n")


def snapshot(path: Path) -> xr.Dataset:
    return xr.open_zarr(path, group="s2").load()


@pytest.mark.parametrize("planned", [True, False], ids=["metadata-planned", "header-planned"])
def test_a_second_shard_encodes_only_its_tiles_and_the_index_answers_over_both(tmp_path, client, planned):
    root, store_path = tmp_path / "majortom", tmp_path / "grow.zarr"
    split_sample(root, with_second=False, metadata=planned)
    first = encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client)
    before = snapshot(store_path)
    old_rows = before.sizes["patch"]
    assert first.patches_total == old_rows > 0
    store, directory = EmbeddingStore(store_path), tmp_path / "indexes" / "s2"
    old_index = EmbeddingIndex.build(store.open("s2"), "s2", kind="flat", use_gpu=False)
    old_index.save(directory, store_id=store.store_id)
    query = before["embedding"].values[:3].astype(np.float32)
    old_scores, old_hits = old_index.search(query, 5)

    split_sample(root, with_second=True, metadata=planned)
    log = tmp_path / "read.log"
    grown = encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client, read_hook=RecordReads(log))
    encoded_chunks = log.read_text().split()
    after = snapshot(store_path)

    # only the new shard's tiles were encoded
    assert encoded_chunks and all("part_00002" in key for key in encoded_chunks)
    assert grown.chunks_already_done == first.chunks_total and grown.chunks_encoded == len(encoded_chunks)
    assert any("grew" in note for note in grown.notes)
    # the old rows are untouched, the new ones follow them
    assert after.sizes["patch"] > old_rows
    np.testing.assert_array_equal(after["embedding"].values[:old_rows], before["embedding"].values)
    np.testing.assert_array_equal(after["patch_id"].values[:old_rows], before["patch_id"].values)
    assert bool(after["valid"].values[old_rows:].any())
    assert len(set(after["patch_id"].values.tolist())) == after.sizes["patch"]
    assert bool(after["chunk_done"].values.all())
    # the new rows' timestamps were written through the group's own time encoding
    assert np.issubdtype(after["timestamp"].dtype, np.datetime64) and not np.isnat(after["timestamp"].values[old_rows:]).any()

    # the saved index gains the new rows only (not rebuilt), and answers over both; old hits keep their order
    outcome = grow_index(store, "s2", directory, kind="flat")
    new_valid = int(after["valid"].values[old_rows:].sum())
    assert outcome is not None and outcome.added == new_valid > 0
    index = EmbeddingIndex.load(directory, expected_provenance=store.provenance("s2"), use_gpu=False, store_id=store.store_id)
    assert index.ntotal == int(after["valid"].sum()) == old_index.ntotal + new_valid
    scores, hits = index.search(query, 5)
    for q in range(len(query)):
        old_only = [h for h in hits[q] if h < old_rows]
        assert old_only == [h for h in old_hits[q] if h in old_only]  # same order among old patches
        assert hits[q][0] == old_hits[q][0]  # the query's own patch stays first
    assert (hits >= old_rows).any(), "the grown index must be able to return new patches"

    # a third run has nothing to do and writes nothing
    mtime = (store_path / "s2" / "zarr.json").stat().st_mtime_ns
    again = encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client)
    assert again.nothing_to_do and (store_path / "s2" / "zarr.json").stat().st_mtime_ns == mtime


def test_growing_with_another_model_or_changed_data_is_refused(tmp_path, client):
    root, store_path = tmp_path / "majortom", tmp_path / "grow.zarr"
    split_sample(root, with_second=False)
    encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client)
    split_sample(root, with_second=True)
    with pytest.raises(StoreError, match="never mixed"):
        encode(DatasetSpec("majortom", str(root)), "s2", store_path, EncoderSpec("csmoe-p16", "cpu", 8), client=client)
    # a shard the store holds, rewritten with other tiles, is other data
    images = root / "Core-S2L2A" / "images"
    table = pq.read_table(images / "part_00001.parquet")
    pq.write_table(table.slice(1), images / "part_00001.parquet", row_group_size=1)
    with pytest.raises(StoreError, match="no longer has|now lists|made from"):
        encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client)
    shutil.rmtree(root)


def test_pixels_of_old_and_new_patches_are_read_back_through_their_chunks(tmp_path, client):
    from rsretrieve.datasets import open_dataset
    from rsretrieve.retrieval.archive import Archive

    root, store_path = tmp_path / "majortom", tmp_path / "grow.zarr"
    split_sample(root, with_second=True)
    encode(DatasetSpec("majortom", str(root)), "s2", store_path, MODEL, client=client)
    dataset = open_dataset("majortom", str(root))
    chunks = dataset.chunks("s2")
    first, last = dataset.read_chunk(chunks[0]), dataset.read_chunk(chunks[-1])
    wanted = [last.patch_ids[0], first.patch_ids[0]]
    pixels = Archive(EmbeddingStore(store_path), tmp_path / "indexes").read_pixels("s2", wanted)
    np.testing.assert_array_equal(pixels.fine[0], last.pixels.fine[0])
    np.testing.assert_array_equal(pixels.fine[1], first.pixels.fine[0])
