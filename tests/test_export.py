"""`rsretrieve export`: a store as one GeoParquet file in Major TOM's embedding layout, read back with
geopandas and DuckDB."""

import json
import shutil

import duckdb
import geopandas as gpd
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import xarray as xr

from rsretrieve import geo
from rsretrieve.datasets import sample_root
from rsretrieve.errors import StoreError
from rsretrieve.export import geoparquet
from rsretrieve.export.geoparquet import MAJORTOM_COLUMNS, OUR_COLUMNS, export_geoparquet
from test_cli import assert_clean_error, run

MODEL = "csmoe-tiny"

# The GeoParquet 1.1.0 metadata schema (opengeospatial/geoparquet, format-specs/schema.json at v1.1.0)
# less the PROJJSON reference of `crs`, which this export leaves out (meaning OGC:CRS84).
GEO_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["version", "primary_column", "columns"],
    "properties": {
        "version": {"type": "string", "const": "1.1.0"},
        "primary_column": {"type": "string", "minLength": 1},
        "columns": {"type": "object", "minProperties": 1, "patternProperties": {".+": {
            "type": "object",
            "required": ["encoding", "geometry_types"],
            "properties": {
                "encoding": {"type": "string", "pattern": "^(WKB|point|linestring|polygon|multipoint|multilinestring|multipolygon)$"},
                "geometry_types": {"type": "array", "uniqueItems": True,
                                   "items": {"type": "string", "pattern": "^(GeometryCollection|(Multi)?(Point|LineString|Polygon))( Z)?$"}},
                "edges": {"type": "string", "enum": ["planar", "spherical"]},
                "orientation": {"type": "string", "const": "counterclockwise"},
                "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                "epoch": {"type": "number"},
                "covering": {"type": "object", "required": ["bbox"], "properties": {"bbox": {
                    "type": "object", "required": ["xmin", "xmax", "ymin", "ymax"],
                    "properties": {k: {"type": "array", "items": [{"type": "string", "minLength": 1}, {"const": k}],
                                       "minItems": 2, "maxItems": 2} for k in ("xmin", "ymin", "xmax", "ymax")}}}},
            }}}},
    },
}


def build(path, dataset="sample", root=None, options=(("include_snow_cloud", True),), modalities=("s1", "s2"), dtype=None):
    from distributed import Client

    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        for m in modalities:
            encode(DatasetSpec(dataset, root=root, options=options), m, path, EncoderSpec(MODEL, "cpu", 8), client=client, dtype=dtype)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build(tmp_path_factory.mktemp("export") / "sample--csmoe-tiny.zarr")


@pytest.fixture(scope="module")
def exported(store, tmp_path_factory):
    """The store exported by the command, as a user runs it."""
    out = tmp_path_factory.mktemp("out") / "sample.parquet"
    proc = run(["export", store, "--format", "geoparquet", out], tmp_path_factory.mktemp("ws"))
    return out, proc


def stored(store, modality):
    ds = xr.open_zarr(store, group=modality)
    return ds, {pid: i for i, pid in enumerate(ds["patch_id"].values.tolist())}


def test_the_command_writes_both_modalities_to_one_file(store, exported):
    out, proc = exported
    assert "wrote 48 rows (S1 24, S2 24)" in proc.stdout and " KB" in proc.stdout
    assert "RANDOM WEIGHTS" in proc.stderr  # random weights are stated
    gdf = gpd.read_parquet(out)
    assert gdf.crs is not None and gdf.crs.to_string() in ("EPSG:4326", "OGC:CRS84")
    assert len(gdf) == 48 and gdf["modality"].value_counts().to_dict() == {"s1": 24, "s2": 24}
    assert pq.read_schema(out).names == [*MAJORTOM_COLUMNS, *OUR_COLUMNS]
    assert list(gdf.columns) == [*MAJORTOM_COLUMNS, *OUR_COLUMNS[:-1]]  # geopandas leaves the bbox covering out
    assert gdf.geometry.name == "geometry" and set(gdf.geom_type) == {"Polygon"}
    points = gpd.GeoSeries(gpd.points_from_xy(gdf["centre_lon"], gdf["centre_lat"]), index=gdf.index, crs=gdf.crs)
    assert gdf.geometry.contains(points).all()
    assert gdf["unique_id"].str.fullmatch("[0-9a-f]{64}").all() and gdf["unique_id"].is_unique
    for modality in ("s1", "s2"):
        ds, row = stored(store, modality)
        names = ds["label"].values.tolist()
        part = gdf[gdf["modality"] == modality]
        for _, r in part.iterrows():
            i = row[r["patch_id"]]
            np.testing.assert_array_equal(np.asarray(r["embedding"], dtype=np.float32), ds["embedding"].values[i])
            assert r["pair_id"] == ds["pair_id"].values[i] and r["split"] == ds["split"].values[i]
            assert list(r["labels"]) == [n for n, hot in zip(names, ds["labels"].values[i]) if hot]
            assert r["centre_lat"] == pytest.approx(ds["lat"].values[i], abs=1e-5)
            assert r["timestamp"] == np.datetime_as_string(ds["timestamp"].values[i], unit="s").replace("-", "").replace(":", "")
            assert r["utm_crs"] == "EPSG:32633" if "33UUP" in r["patch_id"] else r["utm_crs"] == "EPSG:32635"
            assert r["grid_cell"] == geo.grid_cell(ds["lat"].values[i], ds["lon"].values[i])
            assert (r["grid_row_u"], r["grid_col_r"]) == geo.parse_grid_cell(r["grid_cell"])
            assert list(r["pixel_bbox"]) == [0, 0, 120, 120]  # a BigEarthNet patch is its own image
            utm = shapely.from_wkt(r["utm_footprint"])
            assert utm.area == pytest.approx(1200.0 ** 2, rel=1e-9)
        assert part["product_id"].notna().all() and part["country"].isin(["Austria", "Finland"]).all()


def test_file_metadata_and_duckdb(exported):
    out, _ = exported
    meta = pq.ParquetFile(out).metadata.metadata
    assert meta[b"model"] == MODEL.encode() and meta[b"checkpoint_sha256"] == b"random-init" and meta[b"random_init"] == b"true"
    ours = json.loads(meta[b"rsretrieve"])
    assert ours["random_init"] is True and ours["embedding_normalised"] is False and ours["modalities"] == ["s1", "s2"]
    assert ours["provenance"]["s2"]["model"] == MODEL and ours["store_id"]
    assert duckdb.sql(f"select count(*) from '{out}'").fetchall()[0][0] == 48
    assert duckdb.sql(f"select count(*) from '{out}' where modality = 's1' and len(embedding) = 64").fetchall()[0][0] == 24
    keys = {k for (k,) in duckdb.sql(f"select decode(key) from parquet_kv_metadata('{out}')").fetchall()}
    assert {"geo", "model", "checkpoint_sha256", "random_init", "rsretrieve"} <= keys


def test_geo_metadata_is_geoparquet_1_1(exported):
    out, _ = exported
    for metadata in (pq.ParquetFile(out).metadata.metadata, pq.read_schema(out).metadata):  # the file's and Arrow's
        geo_meta = json.loads(metadata[b"geo"])
        jsonschema.validate(geo_meta, GEO_SCHEMA)
        column = geo_meta["columns"][geo_meta["primary_column"]]
        assert geo_meta["primary_column"] == "geometry" and column["encoding"] == "WKB"
        assert column["geometry_types"] == ["Polygon"] and "crs" not in column  # no crs: OGC:CRS84
        gdf = gpd.read_parquet(out)
        np.testing.assert_allclose(column["bbox"], gdf.total_bounds, rtol=0, atol=1e-12)
    assert all(shapely.is_ccw(g.exterior) for g in gdf.geometry)
    covering = pq.read_table(out, columns=["bbox"])["bbox"].to_pylist()
    bounds = np.array([[b["xmin"], b["ymin"], b["xmax"], b["ymax"]] for b in covering])
    np.testing.assert_allclose(bounds, gdf.geometry.bounds.to_numpy(), rtol=0, atol=1e-12)  # the bbox covering
    austria = gpd.read_parquet(out, bbox=(12.0, 47.0, 15.0, 49.0))  # geopandas filters through it
    assert set(austria["country"]) == {"Austria"} and len(austria) == (gdf["country"] == "Austria").sum() < len(gdf)


def test_the_function_reads_the_store_in_row_slices(store, tmp_path, monkeypatch):
    reads = []
    real = geoparquet._rows

    def spy(ds, name, start, stop):
        reads.append((name, start, stop))
        return real(ds, name, start, stop)

    monkeypatch.setattr(geoparquet, "_rows", spy)
    progress = []
    summary = export_geoparquet(store, tmp_path / "s2.parquet", "s2", batch_rows=5, on_start=progress.append, on_rows=progress.append)
    assert summary.rows == 24 and summary.rows_by_modality == {"s2": 24} and summary.random_init
    assert progress == [24, 5, 5, 5, 5, 4] and summary.bytes == (tmp_path / "s2.parquet").stat().st_size
    embedding_reads = [(a, b) for name, a, b in reads if name == "embedding"]
    assert embedding_reads == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    assert all(b - a <= 5 for _, a, b in reads)
    assert pq.ParquetFile(tmp_path / "s2.parquet").metadata.num_row_groups == 5
    assert set(gpd.read_parquet(tmp_path / "s2.parquet")["modality"]) == {"s2"}


def test_the_default_store_is_the_current_selection(store, tmp_path):
    from rsretrieve.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(store, ws.selection_store(ws.select(model=MODEL)))  # remembered: current model
    proc = run(["export", tmp_path / "current.parquet", "--modality", "s1"], ws.path)
    assert "wrote 24 rows (S1 24)" in proc.stdout
    assert len(gpd.read_parquet(tmp_path / "current.parquet")) == 24


def test_a_major_tom_store(tmp_path):
    mt = build(tmp_path / "majortom.zarr", "majortom", str(sample_root() / "majortom"), options=())
    gdf = gpd.read_parquet(export_geoparquet(mt, tmp_path / "mt.parquet").path)
    ds, row = stored(mt, "s2")
    assert len(gdf) == 48 and gdf["labels"].isna().all() and gdf["split"].isna().all()
    s2 = gdf[gdf["modality"] == "s2"]
    for _, r in s2.iterrows():
        assert r["grid_cell"] == ds["grid_cell"].values[row[r["patch_id"]]]  # the tile's cell, as stored
        assert r["patch_id"].startswith(r["product_id"] + "/") and list(r["pixel_bbox"]) == [0, 0, 120, 120]
    assert gdf.geometry.contains(gpd.GeoSeries(gpd.points_from_xy(gdf["centre_lon"], gdf["centre_lat"]), index=gdf.index, crs=gdf.crs)).all()
    # windows inside a 1068 px cell: [col_start, row_start, col_end, row_end] from the id's <row>_<col>
    assert geoparquet._pixel_bbox("S2B_MSIL2A_X_T33UUP_Y/539U_97R/105_210") == [210, 105, 330, 225]


def test_a_float16_store_stays_float16(tmp_path):
    f16 = build(tmp_path / "f16.zarr", modalities=("s2",), dtype="float16")
    out = export_geoparquet(f16, tmp_path / "f16.parquet").path
    assert str(pq.read_schema(out).field("embedding").type) == "fixed_size_list<element: halffloat>[64]"
    ds, row = stored(f16, "s2")
    gdf = gpd.read_parquet(out)
    np.testing.assert_array_equal(np.stack(gdf["embedding"].to_numpy()), ds["embedding"].values[[row[p] for p in gdf["patch_id"]]])
    assert duckdb.sql(f"select count(*) from '{out}'").fetchall()[0][0] == 24


def test_a_missing_or_damaged_store_is_one_line(store, tmp_path):
    only_s2 = tmp_path / "only_s2.zarr"
    shutil.copytree(store, only_s2)
    shutil.rmtree(only_s2 / "s1")
    assert_clean_error(run(["export", only_s2, tmp_path / "o.parquet", "--modality", "s1"], tmp_path, check=False),
                       "has no S1 embeddings")
    assert_clean_error(run(["export", tmp_path / "nothing.zarr", tmp_path / "o.parquet"], tmp_path, check=False), "no such store")

    lost = tmp_path / "lost.zarr"  # a chunk file gone: the ledger says done, the data is missing
    shutil.copytree(store, lost)
    (lost / "s2" / "embedding" / "c" / "0" / "0").unlink()
    assert_clean_error(run(["export", lost, tmp_path / "o.parquet"], tmp_path, check=False), "damaged chunk", "rsretrieve verify")
    with pytest.raises(StoreError, match="not finite"):  # the function alone notices it too
        export_geoparquet(lost, tmp_path / "o.parquet", "s2")

    garbled = tmp_path / "garbled.zarr"
    shutil.copytree(store, garbled)
    (garbled / "s2" / "zarr.json").write_text("{not json")
    (garbled / "zarr.json").write_text("{not json")
    assert_clean_error(run(["export", garbled, tmp_path / "o.parquet", "--modality", "s2"], tmp_path, check=False), "garbled.zarr")
    with pytest.raises(StoreError, match="garbled.zarr/s2: unreadable store group"):
        export_geoparquet(garbled, tmp_path / "o.parquet", "s2")
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob(".*partial"))


def test_the_output_is_checked_before_any_work(tmp_path):
    proc = run(["export", tmp_path / "no-store.zarr", tmp_path / "missing" / "o.parquet"], tmp_path, check=False)
    assert_clean_error(proc, "missing/o.parquet", "does not exist")  # named before the store is looked at
    assert_clean_error(run(["export", tmp_path / "no-store.zarr", tmp_path], tmp_path, check=False), "is a folder")


def test_a_failed_export_leaves_no_half_file(store, tmp_path, monkeypatch):
    out = tmp_path / "kept.parquet"
    out.write_bytes(b"the previous export")
    real, calls = geoparquet._batch, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the export
        return real(*args, **kwargs)

    monkeypatch.setattr(geoparquet, "_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        export_geoparquet(store, out, batch_rows=10)
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.parquet"]
