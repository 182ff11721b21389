"""The encoder stage: the bundled sample through a real Dask LocalCluster into a Zarr store."""

import os
import sys
import warnings

import cloudpickle
import numpy as np
import pytest
import xarray as xr

from rsretrieve.indexer.pipeline import DatasetSpec, EncodeInterrupted, EncoderSpec, encode
from rsretrieve.models.checkpoint import load_model
from rsretrieve.datasets import open_dataset
from rsretrieve.models.inference import embed_raw
from rsretrieve.errors import StoreError
from rsretrieve.labels import CLASSES

MODEL = "csmoe-tiny"
# chunks of 4 patches so that the sample spans several chunks and an interruption lands mid-way
SAMPLE = DatasetSpec("sample", options=(("chunk_size", 4), ("include_snow_cloud", True)))

# the fault-injecting hook below must travel to worker processes by value
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=2, resources={"encoder": 1}, processes=True, dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, client):
    path = tmp_path_factory.mktemp("stores") / "full.zarr"
    for modality in ("s1", "s2"):
        encode(SAMPLE, modality, path, EncoderSpec(MODEL, "cpu", 8), client=client)
    return path


def test_store_reads_back_with_plain_xarray(full_store):
    reference = open_dataset("sample", include_snow_cloud=True)
    for modality in ("s1", "s2"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # consolidated metadata: a plain open must not warn
            ds = xr.open_zarr(full_store, group=modality)
        meta = reference.metadata(modality)
        assert ds.sizes["patch"] == meta.num_rows == 24
        assert ds.sizes["dim"] == 64
        assert bool(ds["valid"].all())
        assert len(set(ds["patch_id"].values.tolist())) == 24
        assert len(set(ds["pair_id"].values.tolist())) == 24
        assert list(ds["label"].values.tolist()) == list(CLASSES)
        assert ds["labels"].dtype == bool and int(ds["labels"].sum()) >= 24  # every patch has a label
        assert set(ds["split"].values.tolist()) >= {"train", "validation", "test"}
        assert np.isfinite(ds["lat"].values).all() and np.isfinite(ds["lon"].values).all()
        prov = ds.attrs["provenance"]
        assert prov["model"] == MODEL and prov["checkpoint_sha256"] == "random-init"
        assert prov["preprocessing"]["name"] == "benv2-nearest" and prov["preprocessing"]["s2_bands"][0] == "B02"
        assert "rsretrieve_version" in prov and "created" in prov


def test_store_embeddings_equal_the_model_called_directly(full_store):
    model = load_model(MODEL)
    dataset = open_dataset("sample", include_snow_cloud=True)
    for modality in ("s1", "s2"):
        ds = xr.open_zarr(full_store, group=modality)
        row_of = {pid: i for i, pid in enumerate(ds["patch_id"].values.tolist())}
        for chunk in dataset.chunks(modality)[:2]:
            batch = dataset.read_chunk(chunk)
            direct = embed_raw(model, batch.pixels, modality, "cpu")
            stored = ds["embedding"].values[[row_of[p] for p in batch.patch_ids]]
            np.testing.assert_allclose(stored, direct, rtol=1e-4, atol=1e-5)


def fail_from_third_chunk(chunk):
    if int(chunk.key.rsplit(":", 1)[-1]) >= 2:
        raise RuntimeError(f"injected worker failure at {chunk.key}")


def test_interrupted_encode_resumes_to_the_same_store(tmp_path, client, full_store):
    path = tmp_path / "resumed.zarr"
    encoder = EncoderSpec(MODEL, "cpu", 8)
    with pytest.raises(EncodeInterrupted, match="injected worker failure") as info:
        encode(SAMPLE, "s2", path, encoder, client=client, chunk_hook=fail_from_third_chunk)
    partial = xr.open_zarr(path, group="s2")
    written = int(partial["chunk_done"].sum())
    assert 0 < written < partial.sizes["chunk"], "the failure must land mid-way"
    assert info.value.summary.chunks_encoded == written

    resumed = encode(SAMPLE, "s2", path, encoder, client=client)
    assert resumed.chunks_already_done == written
    assert resumed.chunks_encoded == resumed.chunks_total - written

    final, reference = xr.open_zarr(path, group="s2"), xr.open_zarr(full_store, group="s2")
    assert bool(final["chunk_done"].all()) and bool(final["valid"].all())
    ids = final["patch_id"].values.tolist()
    assert len(ids) == len(set(ids)) == 24
    assert list(ids) == list(reference["patch_id"].values.tolist())
    np.testing.assert_allclose(final["embedding"].values, reference["embedding"].values, rtol=1e-5, atol=1e-6)

    again = encode(SAMPLE, "s2", path, encoder, client=client)
    assert again.nothing_to_do and again.chunks_encoded == 0


def test_second_model_is_refused_on_an_existing_store(full_store, client):
    before = xr.open_zarr(full_store, group="s1")["embedding"].values.copy()
    with pytest.raises(StoreError, match="never mixed"):
        encode(SAMPLE, "s1", full_store, EncoderSpec("csmae-tiny", "cpu", 8), client=client)
    after = xr.open_zarr(full_store, group="s1")["embedding"].values
    np.testing.assert_array_equal(before, after)  # nothing already written is damaged


def test_float16_store(tmp_path, client):
    path = tmp_path / "half.zarr"
    encode(SAMPLE, "s1", path, EncoderSpec(MODEL, "cpu", 8), client=client, dtype="float16")
    ds = xr.open_zarr(path, group="s1")
    assert ds["embedding"].dtype == np.float16 and bool(ds["valid"].all())
    again = encode(SAMPLE, "s1", path, EncoderSpec(MODEL, "cpu", 8), client=client)  # no dtype: the store's
    assert again.nothing_to_do
    with pytest.raises(StoreError, match="dtype"):
        encode(SAMPLE, "s1", path, EncoderSpec(MODEL, "cpu", 8), client=client, dtype="float32")


def test_s1_and_s2_of_one_store_come_from_one_model(tmp_path, client):
    path = tmp_path / "mixed.zarr"
    encode(SAMPLE, "s1", path, EncoderSpec(MODEL, "cpu", 8), client=client)
    with pytest.raises(StoreError, match="cannot join"):
        encode(SAMPLE, "s2", path, EncoderSpec("csmae-tiny", "cpu", 8), client=client)
    assert not (path / "s2").exists()


def test_a_crash_while_creating_a_group_leaves_the_store_usable(tmp_path, client, monkeypatch):
    import zarr

    from rsretrieve.store import zarr_store as store_module

    path = tmp_path / "crash.zarr"
    encode(SAMPLE, "s1", path, EncoderSpec(MODEL, "cpu", 8), client=client)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing the S2 group's skeleton

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(KeyboardInterrupt):
        encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8), client=client)
    monkeypatch.undo()
    assert not (path / "s2").exists() and not list(tmp_path.glob(".*partial"))
    # a crash after the group was moved in but before consolidation: a plain open still works
    encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8), client=client)
    (path / "s2").rename(tmp_path / "s2-away")
    zarr.consolidate_metadata(path)  # the root's consolidated metadata now lacks s2, on disk
    (tmp_path / "s2-away").rename(path / "s2")
    assert bool(store_module.EmbeddingStore(path).open("s2")["valid"].all())  # falls back to plain metadata
    again = encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8), client=client)
    assert again.nothing_to_do
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool(xr.open_zarr(path, group="s2")["valid"].all())  # re-consolidated by that run


def swap_checkpoint_under_the_workers(chunk):
    """Runs in the worker before it loads the model: the file it then loads is not the one the
    client described (as when workers do not see the same checkpoint)."""
    import os
    import shutil

    source = os.environ.get("RSRETRIEVE_TEST_SWAP_FROM")
    if source:
        shutil.copyfile(source, os.environ["RSRETRIEVE_TEST_SWAP_TO"])
        os.environ.pop("RSRETRIEVE_TEST_SWAP_FROM")


def test_workers_running_another_checkpoint_are_refused(tmp_path, client):
    from rsretrieve.models.checkpoint import save_model
    from rsretrieve.models.csmoe import create_model

    first = save_model(create_model(MODEL, seed=1), tmp_path / "a" / "tiny.safetensors")
    other = save_model(create_model(MODEL, seed=2), tmp_path / "b" / "tiny.safetensors")
    client.run(lambda: os.environ.update(RSRETRIEVE_TEST_SWAP_FROM=str(other), RSRETRIEVE_TEST_SWAP_TO=str(first)))
    path = tmp_path / "swapped.zarr"
    with pytest.raises(EncodeInterrupted, match="workers must see the same checkpoint"):
        encode(SAMPLE, "s2", path, EncoderSpec(str(first), "cpu", 8), client=client, chunk_hook=swap_checkpoint_under_the_workers)
    assert not bool(xr.open_zarr(path, group="s2")["valid"].any())  # nothing of the other model written


def test_major_tom_shards_encode_and_pair_by_grid_cell(tmp_path, client):
    from rsretrieve.datasets import sample_root

    spec = DatasetSpec("majortom", str(sample_root() / "majortom"))
    path = tmp_path / "majortom.zarr"
    for modality in ("s1", "s2"):
        summary = encode(spec, modality, path, EncoderSpec(MODEL, "cpu", 8), client=client)
        assert summary.patches_encoded == 24 and not summary.skipped
    s1, s2 = xr.open_zarr(path, group="s1"), xr.open_zarr(path, group="s2")
    assert bool(s1["valid"].all()) and bool(s2["valid"].all())
    assert sorted(s1["pair_id"].values.tolist()) == sorted(s2["pair_id"].values.tolist())
    assert all("_" in cell and cell[-1] in "LR" for cell in s2["grid_cell"].values.tolist())
    assert np.isfinite(s2["lat"].values).all()


def test_major_tom_store_of_reader_nearest_odd_windows_is_refused_for_a_bicubic_model(tmp_path, client):
    """A Major TOM store written when the reader nearest-upsampled odd windows (its record of the
    reader has no `coarse`) holds other embeddings than CSMAE makes now; a nearest model's are the same."""
    import zarr

    from rsretrieve.datasets import sample_root

    spec = DatasetSpec("majortom", str(sample_root() / "majortom"))
    for model, refused in (("csmae-tiny", True), (MODEL, False)):
        path = tmp_path / f"{model}.zarr"
        encode(spec, "s2", path, EncoderSpec(model, "cpu", 8), client=client)
        group = zarr.open_group(path / "s2", mode="r+", zarr_format=3)
        provenance = dict(group.attrs["provenance"])
        reader = {k: v for k, v in provenance["dataset"]["reader"].items() if k != "coarse"}
        assert provenance["dataset"]["reader"]["coarse"] == "model" and reader["windows"] == "majortom"
        group.attrs["provenance"] = {**provenance, "dataset": {**provenance["dataset"], "reader": reader}}
        if refused:
            with pytest.raises(StoreError, match="nearest-upsampled by the reader"):
                encode(spec, "s2", path, EncoderSpec(model, "cpu", 8), client=client)
        else:
            assert encode(spec, "s2", path, EncoderSpec(model, "cpu", 8), client=client).patches_encoded == 0
