"""The store reads naturally in xarray: `patch_id` an index, the ledger among the coordinates, the
whole store a DataTree, and the embeddings' normalisation state in their attributes."""

import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
from rsretrieve.store import EmbeddingStore

SAMPLE = DatasetSpec("sample", options=(("chunk_size", 4), ("include_snow_cloud", True)))
LEDGER = {"chunk_key", "chunk_start", "chunk_stop", "chunk_done", "chunk_valid"}


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    from distributed import Client

    path = tmp_path_factory.mktemp("xarray") / "store.zarr"
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        for modality in ("s1", "s2"):
            encode(SAMPLE, modality, path, EncoderSpec("csmoe-tiny", "cpu", 8), client=client)
    return path


def plain(path, modality: str) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain open, without rsretrieve, must not warn
        return xr.open_zarr(path, group=modality)


def test_sel_by_patch_id_gives_one_patch(store_path):
    reference = plain(store_path, "s2")
    ids = reference["patch_id"].values.tolist()
    ds = EmbeddingStore(store_path).open("s2")
    assert "patch_id" in ds.xindexes  # a real index, not a lookup xarray builds for each sel
    one = ds.sel(patch_id=ids[5])
    assert "patch" not in one.dims and str(one["patch_id"].values) == ids[5]
    np.testing.assert_array_equal(one["embedding"].values, reference["embedding"].values[5])
    assert ds.sel(patch_id=[ids[2], ids[7]]).sizes["patch"] == 2


def test_rows_still_select_by_position(store_path):
    """What `Archive.search` does with the hits' rows."""
    ids = plain(store_path, "s1")["patch_id"].values.tolist()
    found = EmbeddingStore(store_path).open("s1").drop_vars("embedding").isel(patch=[3, 0]).compute()
    assert found["patch_id"].values.tolist() == [ids[3], ids[0]]
    assert bool(found["valid"].all())


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_ledger_is_coordinates(store_path, modality):
    for ds in (plain(store_path, modality), EmbeddingStore(store_path).open(modality)):
        assert set(ds.data_vars) == {"embedding", "valid"}
        assert LEDGER <= set(ds.coords) and ds["chunk_done"].dims == ("chunk",)
        assert bool(ds["chunk_done"].all())
    group = zarr.open_group(store_path / modality, mode="r")  # on disk: the same arrays as before
    assert LEDGER <= set(group.array_keys())
    assert set(group.attrs["coordinates"].split()) >= LEDGER


def test_store_opens_as_a_datatree(store_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(store_path, engine="zarr")
    assert set(tree.children) == {"s1", "s2"}
    for modality in ("s1", "s2"):
        assert tree[modality]["embedding"].shape == (24, 64)
        assert set(tree[modality].data_vars) == {"embedding", "valid"}


def test_open_tree_indexes_each_child(store_path):
    store = EmbeddingStore(store_path)
    tree = store.open_tree()
    assert set(tree.children) == {"s1", "s2"} and tree.attrs["store_id"] == store.store_id
    for modality in ("s1", "s2"):
        child = tree[modality].to_dataset()
        pid = str(child["patch_id"].values[4])
        assert "patch_id" in child.xindexes and str(child.sel(patch_id=pid)["patch_id"].values) == pid
        assert child["embedding"].attrs["normalised"] is False


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_attributes_say_embeddings_are_not_normalised(store_path, modality):
    ds = plain(store_path, modality)
    attrs = ds["embedding"].attrs
    assert attrs["normalised"] is False and "L2-normalise" in attrs["comment"]
    assert "not L2-normalised" in ds.attrs["description"]
    norms = np.linalg.norm(ds["embedding"].values.astype(np.float64), axis=1)
    assert not np.allclose(norms, 1.0)  # what the attribute says is true: raw vectors


def test_store_written_before_the_ledger_became_coordinates(store_path, tmp_path):
    """An older store lists only `labels` as a free coordinate: plain xarray shows its ledger as data
    variables, `EmbeddingStore.open` as coordinates."""
    old = tmp_path / "old.zarr"
    shutil.copytree(store_path, old)
    zarr.open_group(old / "s2", mode="r+").attrs["coordinates"] = "labels"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # consolidated metadata is a zarr-python extension
        zarr.consolidate_metadata(old)
    assert LEDGER <= set(plain(old, "s2").data_vars)
    ds = EmbeddingStore(old).open("s2")
    assert set(ds.data_vars) == {"embedding", "valid"} and LEDGER <= set(ds.coords)
    assert ds.sel(patch_id=str(ds["patch_id"].values[0])).sizes["chunk"] == ds.sizes["chunk"]
    tree = EmbeddingStore(old).open_tree()
    assert set(tree["s2"].data_vars) == {"embedding", "valid"}


def test_locations_half_written_by_a_killed_run_are_written_again(tmp_path):
    """lat is written before lon: a kill between the two leaves lon NaN, and the chunk's next write
    must not take the finite lat for "planned with locations already"."""
    import pyarrow as pa

    from rsretrieve.store import ChunkSpan

    meta = pa.table({"patch_id": ["a", "b"], "lat": pa.array([None, None], pa.float64()), "lon": pa.array([None, None], pa.float64())})
    span = ChunkSpan("c0", 0, 2)
    store = EmbeddingStore(tmp_path / "s.zarr")
    store.create("s2", meta, [span], 3, {"model": "m"})
    store.write_chunk("s2", span, ["a", "b"], np.ones((2, 3), np.float32), ([50.0, 51.0], [10.0, 11.0]))
    group = store.zarr_group("s2", "r+")
    group["lon"][:] = np.nan  # killed after lat was written
    store.write_chunk("s2", span, ["a", "b"], np.ones((2, 3), np.float32), ([50.0, 51.0], [10.0, 11.0]))
    assert group["lon"][:].tolist() == [10.0, 11.0]
