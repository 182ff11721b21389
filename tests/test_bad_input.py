"""Bad input: one clear DataError naming the file; bulk reads skip and report, keep the rest."""

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from rsretrieve.datasets.benv2 import band_path
from rsretrieve.datasets.benv2_patch import read_band_tif
from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.errors import DataError
from rsretrieve.datasets.tile import read_tile

ROOT = sample_root()
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "benv2"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    return root


def one_line(e: Exception, name: str):
    msg = str(e)
    assert "\n" not in msg and name in msg, msg


def first(ds, modality="s2"):
    return ds.names(modality)[0], ds.names(modality)[1]


def test_truncated_geotiff(tree):
    ds = open_dataset("benv2", tree)
    bad, good = first(ds)
    p = band_path(tree, bad, "s2", "B03")
    p.write_bytes(p.read_bytes()[:600])
    with pytest.raises(DataError) as e:
        read_band_tif(p)
    one_line(e.value, p.name)
    batch = ds.read_chunk(ds.chunks("s2")[0])
    assert [s[0] for s in batch.skipped] == [bad] and p.name in batch.skipped[0][1]
    assert bad not in batch.patch_ids and good in batch.patch_ids and len(batch) == 17
    assert np.isfinite(batch.pixels.stacked()).all()


def test_corrupt_geotiff(tree):
    ds = open_dataset("benv2", tree)
    bad, _ = first(ds)
    p = band_path(tree, bad, "s2", "B8A")
    p.write_bytes(b"this is not a tiff" * 20)
    with pytest.raises(DataError) as e:
        ds.read_patch(bad, "s2")
    one_line(e.value, p.name)
    assert len(ds.read_chunk(ds.chunks("s2")[0])) == 17


def test_missing_band(tree):
    ds = open_dataset("benv2", tree)
    bad, _ = first(ds, "s1")
    p = band_path(tree, bad, "s1", "VH")
    p.unlink()
    with pytest.raises(DataError, match="missing band file") as e:
        ds.read_patch(bad, "s1")
    one_line(e.value, p.name)
    batch = ds.read_chunk(ds.chunks("s1")[0])
    assert batch.skipped == [(bad, str(e.value))] and len(batch) == 17


def test_nan_in_s1_skipped(tree):
    ds = open_dataset("benv2", tree)
    bad, _ = first(ds, "s1")
    p = band_path(tree, bad, "s1", "VV")
    with rasterio.open(p) as src:
        arr, prof = src.read(1), src.profile
    arr[5, 7] = np.nan
    with rasterio.open(p, "w", **prof) as dst:
        dst.write(arr, 1)
    with pytest.raises(DataError, match="NaN") as e:
        ds.read_patch(bad, "s1")
    one_line(e.value, p.name)
    batch = ds.read_chunk(ds.chunks("s1")[0])
    assert [s[0] for s in batch.skipped] == [bad] and np.isfinite(batch.pixels.stacked()).all()


@pytest.mark.parametrize("size", [120, 100])
def test_wrong_band_shape_in_tree(tree, size):
    """B05 alone at 120 px, not a nearest-upsampled copy (the others at 60 px), or at 100 px."""
    ds = open_dataset("benv2", tree)
    bad, _ = first(ds)
    p = band_path(tree, bad, "s2", "B05")
    with rasterio.open(p) as src:
        prof = src.profile
    prof.update(width=size, height=size)
    with rasterio.open(p, "w", **prof) as dst:
        dst.write(np.arange(size * size, dtype=np.uint16).reshape(1, size, size))
    with pytest.raises(DataError, match="mixed sizes: B05 at 120 px" if size == 120 else r"B05 is \(100, 100\)") as e:
        ds.read_patch(bad, "s2")
    one_line(e.value, bad)


def _write(path: Path, data: np.ndarray, descriptions=None):
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=data.dtype.name) as ds:
        ds.write(data)
        for i, d in enumerate(descriptions or []):
            ds.set_band_description(i + 1, d)


def test_query_tile_wrong_band_count_and_modality(tmp_path):
    p = tmp_path / "tile.tif"
    _write(p, np.ones((10, 120, 120), np.uint16))
    with pytest.raises(DataError) as e:
        read_tile(p, "s1")
    assert str(e.value) == f"{p}: has 10 bands (Sentinel-2) but --modality s1 was given"
    p3 = tmp_path / "rgb.tif"
    _write(p3, np.ones((3, 120, 120), np.uint16))
    with pytest.raises(DataError, match="has 3 band") as e:
        read_tile(p3)
    one_line(e.value, "rgb.tif")


def test_query_tile_wrong_dtype(tmp_path):
    p = tmp_path / "s2_uint8.tif"
    _write(p, np.ones((10, 120, 120), np.uint8))
    with pytest.raises(DataError, match="dtype uint8") as e:
        read_tile(p)
    one_line(e.value, p.name)
    p1 = tmp_path / "s1_int.tif"
    _write(p1, np.ones((2, 120, 120), np.int16))
    with pytest.raises(DataError, match="dtype int16") as e:
        read_tile(p1)
    one_line(e.value, p1.name)


def test_query_tile_nan(tmp_path):
    data = np.full((2, 120, 120), -12.0, np.float32)
    data[0, 3, 3] = np.nan
    p = tmp_path / "nan.tif"
    _write(p, data)
    with pytest.raises(DataError, match="invalid pixel") as e:
        read_tile(p)
    one_line(e.value, p.name)
    big = np.full((2, 240, 240), -12.0, np.float32)
    big[1, 200, 10] = np.nan
    pb = tmp_path / "big.tif"
    _write(pb, big)
    q = read_tile(pb)
    assert len(q.pixels) == 3 and len(q.skipped) == 1 and np.isfinite(q.pixels.fine).all()


def test_query_tile_descriptions_reorder_and_truncated(tmp_path):
    data = np.stack([np.full((120, 120), -10.0, np.float32), np.full((120, 120), -20.0, np.float32)])
    p = tmp_path / "s1.tif"
    _write(p, data, ["VH", "VV"])  # VH first in the file
    q = read_tile(p)
    np.testing.assert_array_equal(q.pixels.band("VV")[0], -20.0)  # by description, not position
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError) as e:
        read_tile(p)
    one_line(e.value, p.name)


def _mt_copy(tmp_path) -> Path:
    """The sample's shards without metadata.parquet: chunks from the shards themselves (the header
    path; planning from metadata is tested in test_majortom_plan.py)."""
    root = tmp_path / "mt"
    shutil.copytree(ROOT / "majortom", root, ignore=shutil.ignore_patterns("metadata.parquet"))
    return root


def test_majortom_truncated_and_empty_shard(tmp_path):
    root = _mt_copy(tmp_path)
    shard = root / "Core-S2L2A" / "images" / "part_00001.parquet"
    shard.write_bytes(shard.read_bytes()[: 100_000])
    mt = open_dataset("majortom", root)
    with pytest.raises(DataError) as e:
        mt.chunks("s2")
    one_line(e.value, shard.name)
    shard.write_bytes(b"")
    with pytest.raises(DataError) as e:
        mt.chunks("s2")
    one_line(e.value, shard.name)
    assert len(mt.chunks("s1")) == 24  # the other collection is unaffected


def test_majortom_missing_column(tmp_path):
    root = _mt_copy(tmp_path)
    shard = root / "Core-S1RTC" / "images" / "part_00001.parquet"
    t = pq.read_table(shard).drop_columns(["product_datetime"])
    pq.write_table(t, shard, row_group_size=1)
    with pytest.raises(DataError, match="product_datetime") as e:
        open_dataset("majortom", root).chunks("s1")
    one_line(e.value, shard.name)
    t = t.rename_columns([c if c != "vh" else "VH_" for c in t.column_names])
    pq.write_table(t, shard, row_group_size=1)
    with pytest.raises(DataError, match="'timestamp'"):
        open_dataset("majortom", root).chunks("s1")


def test_majortom_timestamp_column_accepted(tmp_path):
    root = _mt_copy(tmp_path)
    shard = root / "Core-S1RTC" / "images" / "part_00001.parquet"
    t = pq.read_table(shard)
    t = t.rename_columns([c if c != "product_datetime" else "timestamp" for c in t.column_names])
    pq.write_table(t, shard, row_group_size=1)
    mt = open_dataset("majortom", root)
    b = mt.read_chunk(mt.chunks("s1")[0])
    assert len(b) == 1 and b.meta.column("timestamp")[0].as_py().year == 2017


def test_majortom_corrupt_cell_skipped(tmp_path):
    import pyarrow as pa

    root = _mt_copy(tmp_path)
    shard = root / "Core-S2L2A" / "images" / "part_00001.parquet"
    t = pq.read_table(shard)
    cells = t.column("B11").to_pylist()
    cells[0] = cells[0][:200]
    t = t.set_column(t.column_names.index("B11"), "B11", pa.array(cells, pa.binary()))
    pq.write_table(t, shard, row_group_size=1)
    mt = open_dataset("majortom", root)
    chunks = mt.chunks("s2")
    b0 = mt.read_chunk(chunks[0])
    assert len(b0) == 0 and len(b0.skipped) == 1 and shard.name in b0.skipped[0][1] and "B11" in b0.skipped[0][1]
    assert "\n" not in b0.skipped[0][1]
    assert sum(len(mt.read_chunk(c)) for c in chunks) == 23


def test_lmdb_missing_entry(tmp_path):
    import lmdb
    from safetensors.numpy import save

    root = tmp_path / "lm"
    root.mkdir()
    shutil.copy(ROOT / "metadata.parquet", root / "metadata.parquet")
    env = lmdb.open(str(root / "L"), map_size=1 << 26)
    ds_tree = open_dataset("sample")
    names = ds_tree.names("s2")
    with env.begin(write=True) as txn:
        for n in names[1:]:
            arrs = {}
            for b in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"):
                with rasterio.open(band_path(ROOT, n, "s2", b)) as f:
                    arrs[b] = f.read(1)
            txn.put(n.encode(), save(arrs))
        txn.put(names[0].encode(), b"garbage")
    env.close()
    ds = open_dataset("benv2", root)
    assert ds.source == "lmdb"
    with pytest.raises(DataError, match="corrupt safetensors") as e:
        ds.read_patch(names[0], "s2")
    one_line(e.value, "L")
    b = ds.read_chunk(ds.chunks("s2")[0])
    assert len(b) == 17 and b.skipped[0][0] == names[0]
    b1 = ds.read_chunk(ds.chunks("s1")[0])
    assert len(b1) == 0 and len(b1.skipped) == 18 and "no entry" in b1.skipped[0][1]


def test_bad_metadata(tmp_path):
    import pyarrow as pa

    root = tmp_path / "b"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    pq.write_table(pa.table({"patch_id": ["x"]}), root / "metadata.parquet")
    with pytest.raises(DataError, match="missing column") as e:
        open_dataset("benv2", root).pairs()
    one_line(e.value, "metadata.parquet")
    (root / "metadata.parquet").write_bytes(b"PAR1trunc")
    with pytest.raises(DataError, match="unreadable parquet"):
        open_dataset("benv2", root).pairs()


def test_query_tile_patch_folder_wrong_modality_and_not_a_patch(tmp_path):
    ds = open_dataset("sample")
    s2_folder = band_path(sample_root(), ds.names("s2")[0], "s2", "B02").parent
    with pytest.raises(DataError) as e:
        read_tile(s2_folder, "s1")
    assert str(e.value) == f"{s2_folder}: is a Sentinel-2 patch folder (B02 ... B12) but --modality s1 was given"
    s1_folder = band_path(sample_root(), ds.names("s1")[0], "s1", "VV").parent
    with pytest.raises(DataError, match="is a Sentinel-1 patch folder") as e:
        read_tile(s1_folder, "s2")
    one_line(e.value, s1_folder.name)
    empty = tmp_path / "not_a_patch"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a BigEarthNet patch folder") as e:
        read_tile(empty)
    one_line(e.value, "not_a_patch")
    # an incomplete S1 folder names the missing band file
    part = tmp_path / s1_folder.name
    part.mkdir()
    shutil.copy(s1_folder / f"{s1_folder.name}_VV.tif", part)
    with pytest.raises(DataError, match="missing band file") as e:
        read_tile(part)
    one_line(e.value, f"{s1_folder.name}_VH.tif")
