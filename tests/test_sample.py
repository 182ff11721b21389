"""The bundled real sample (rsretrieve/data/sample), built by tools/make_sample.py."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.io import MemoryFile

from rsretrieve import geo
from rsretrieve.bands import native_size
from rsretrieve.datasets.benv2 import band_path
from rsretrieve.datasets import sample_root
from rsretrieve.labels import CLASSES

ROOT = sample_root()
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def all_pairs():
    meta = pq.read_table(ROOT / "metadata.parquet").to_pylist()
    snow = pq.read_table(ROOT / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    return meta, snow


def test_counts_and_splits():
    meta, snow = all_pairs()
    assert len(meta) == 18 and len(snow) == 6
    assert sorted(r["split"] for r in meta) == ["test"] * 6 + ["train"] * 6 + ["validation"] * 6
    pairs = {r["patch_id"]: r["s1_name"] for r in meta + snow}
    assert len(pairs) == 24
    assert not any(r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"] for r in meta)
    assert all(r["contains_seasonal_snow"] or r["contains_cloud_or_shadow"] for r in snow)
    s2_dirs = list((ROOT / "BigEarthNet-S2").glob("*/*"))
    s1_dirs = list((ROOT / "BigEarthNet-S1").glob("*/*"))
    assert {d.name for d in s2_dirs} == set(pairs) and {d.name for d in s1_dirs} == set(pairs.values())
    assert (ROOT / "SOURCE.md").read_text().count("CDLA-Permissive-1.0") >= 1


def test_labels_in_nomenclature():
    meta, snow = all_pairs()
    for r in meta + snow:
        assert r["labels"] and set(r["labels"]) <= set(CLASSES)


def test_band_files_shapes_dtypes_georef():
    meta, snow = all_pairs()
    for r in meta + snow:
        for band in S2_ALL:
            with rasterio.open(band_path(ROOT, r["patch_id"], "s2", band)) as ds:
                side = {"B01": 20, "B09": 20}.get(band, native_size(band))
                assert (ds.height, ds.width, ds.count, ds.dtypes[0]) == (side, side, 1, "uint16")
                assert ds.crs is not None and ds.crs.to_epsg() in (32633, 32635)
                assert abs(ds.transform.a) == 1200 / side
        for band in ("VV", "VH"):
            with rasterio.open(band_path(ROOT, r["s1_name"], "s1", band)) as ds:
                assert (ds.height, ds.width, ds.dtypes[0]) == (120, 120, "float32")
                x = ds.read(1)
                assert np.isfinite(x).all() and -50 < x.min() and x.max() < 25  # dB
                with rasterio.open(band_path(ROOT, r["patch_id"], "s2", "B02")) as s2:
                    assert ds.transform == s2.transform and ds.crs == s2.crs  # co-located


def test_tile_crs_by_mgrs_tile():
    meta, snow = all_pairs()
    for r in meta + snow:
        with rasterio.open(band_path(ROOT, r["patch_id"], "s2", "B02")) as ds:
            assert ds.crs.to_epsg() == (32633 if "T33UUP" in r["patch_id"] else 32635)


@pytest.mark.parametrize("modality, coll, bands", [("s2", "Core-S2L2A", S2_ALL), ("s1", "Core-S1RTC", ("vv", "vh"))])
def test_majortom_shard_matches_tree(modality, coll, bands):
    shard = ROOT / "majortom" / coll / "images" / "part_00001.parquet"
    pf = pq.ParquetFile(shard)
    assert pf.metadata.num_row_groups == pf.metadata.num_rows == 24
    names = pf.schema_arrow.names
    for col in ("product_id", "grid_cell", "product_datetime", "thumbnail", *bands):
        assert col in names
    if modality == "s2":
        assert "cloud_mask" in names
    table = pf.read()
    for row in table.to_pylist():
        assert row["thumbnail"][:8] == b"\x89PNG\r\n\x1a\n"
        name = row["source_patch_id"]
        for col in bands:
            with MemoryFile(row[col]) as mf, mf.open() as ds:
                cell = ds.read(1)
                nodata = ds.nodata
            band = col.upper()
            with rasterio.open(band_path(ROOT, name, modality, band)) as ds:
                tree = ds.read(1)
            if modality == "s2":
                assert np.array_equal(cell, tree)
            else:
                assert nodata == -32768 and cell.dtype == np.float32 and (cell > 0).all()
                np.testing.assert_allclose(10 * np.log10(cell.astype(np.float64)), tree, atol=1e-4)
    md = pq.read_table(ROOT / "majortom" / coll / "metadata.parquet")
    for col in ("grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover", "nodata",
                "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row"):
        assert col in md.column_names
    for row in md.to_pylist():
        assert geo.grid_cell(row["centre_lat"], row["centre_lon"]) == row["grid_cell"]
        assert geo.parse_grid_cell(row["grid_cell"]) == (row["grid_row_u"], row["grid_col_r"])


def test_grid_formula():
    assert geo.grid_cell(40.85, 14.27) == "454U_120R"  # Naples, REFERENCE.md section 4
    assert geo.grid_cell(-0.01, -0.01).endswith("D_1L") and geo.grid_cell(-0.01, -0.01).startswith("1D")
    lat, lon = geo.grid_cell_bottom_left("454U_120R")
    assert lat <= 40.85 < lat + geo.ROW_DEG and lon <= 14.27
    assert geo.mgrs_square_origin("33UUP") == (33, 300000.0, 5300000.0)
    assert geo.mgrs_square_origin("33UXP") == (33, 600000.0, 5300000.0)  # Vienna's square
    assert geo.mgrs_square_origin("35VNJ") == (35, 500000.0, 6800000.0)


def test_wheel_lmdb_pixels_identical_to_tree():
    """When the original wheel data is on this machine, the tree holds its pixels unchanged."""
    src = Path("/tmp/wheels/cfg/configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB")
    if not (src / "data.mdb").exists():
        pytest.skip("configilm mock LMDB not unpacked here")
    import lmdb
    from safetensors.numpy import load

    env = lmdb.open(str(src), readonly=True, lock=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            name = key.decode()
            mod = "s1" if name.startswith("S1") else "s2"
            for band, arr in load(bytes(value)).items():
                with rasterio.open(band_path(ROOT, name, mod, band)) as ds:
                    assert np.array_equal(ds.read(1), arr)
    env.close()
