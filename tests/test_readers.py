"""BigEarthNet-v2 tree / LMDB and Major TOM readers on the bundled real sample."""

import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from rsretrieve.datasets.benv2 import band_path
from rsretrieve.datasets import Chunk, PatchBatch, label_matrix, open_dataset, sample_root
from rsretrieve.bands import bands_for
from rsretrieve.labels import multi_hot
from rsretrieve.pixels import RawPixels

ROOT = sample_root()
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def read_all(ds, modality):
    """Every patch on the 10 m grid in `bands_for(modality)` order (raw values), ids, batches."""
    batches = [ds.read_chunk(c) for c in ds.chunks(modality)]
    x = RawPixels.concat([b.pixels for b in batches]).stacked(bands_for(modality))
    ids = sum((b.patch_ids for b in batches), [])
    return x, ids, batches


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_tree_lmdb_majortom_identical(lmdb_root, modality):
    tree = open_dataset("sample", include_snow_cloud=True)
    lm = open_dataset("benv2", lmdb_root, include_snow_cloud=True)
    assert lm.source == "lmdb" and tree.source == "tree"
    xt, idt, _ = read_all(tree, modality)
    xl, idl, _ = read_all(lm, modality)
    assert idt == idl and len(idt) == 24
    assert xt.dtype == np.float32 and xt.shape == (24, 10 if modality == "s2" else 2, 120, 120)
    assert np.isfinite(xt).all()
    np.testing.assert_array_equal(xt, xl)
    mt = open_dataset("majortom", ROOT / "majortom")
    xm, _, batches = read_all(mt, modality)
    src = sum((b.meta.column("source_patch_id").to_pylist() for b in batches), [])
    order = [idt.index(s) for s in src]
    tol = 0 if modality == "s2" else 1e-5
    np.testing.assert_allclose(xm, xt[order], atol=tol, rtol=0)


def test_readers_ship_raw_values_at_native_resolution():
    ds = open_dataset("sample")
    name = ds.names("s2")[0]
    x = ds.read_patch(name, "s2")
    assert x.fine.dtype == np.uint16 and x.fine_bands == ("B02", "B03", "B04", "B08") and x.fine.shape == (1, 4, 120, 120)
    assert x.coarse.dtype == np.uint16 and x.coarse.shape == (1, 6, 60, 60) and x.coarse_bands[0] == "B05"
    with rasterio.open(band_path(ROOT, name, "s2", "B05")) as f:
        np.testing.assert_array_equal(x.band("B05")[0], f.read(1))
    s1 = ds.read_patch(ds.names("s1")[0], "s1")
    assert s1.fine.dtype == np.float32 and s1.fine_bands == ("VV", "VH") and s1.coarse is None
    assert -40 < float(s1.fine.mean()) < 0  # dB


def test_labels_splits_and_pairing():
    meta = {r["patch_id"]: r for r in pq.read_table(ROOT / "metadata.parquet").to_pylist()}
    # the bundled archive keeps all 24 pairs; without the 6 snowy/cloudy ones, the 18 of metadata.parquet
    assert open_dataset("sample").metadata("s2").num_rows == 24
    ds = open_dataset("sample", include_snow_cloud=False)
    m2, m1 = ds.metadata("s2"), ds.metadata("s1")
    assert m2.num_rows == m1.num_rows == 18
    for r2, r1 in zip(m2.to_pylist(), m1.to_pylist()):
        src = meta[r2["patch_id"]]
        assert r2["split"] == src["split"] == r1["split"]
        assert r2["labels"] == src["labels"] == r1["labels"]
        assert r1["patch_id"] == src["s1_name"]  # pairing via s1_name
        assert r1["pair_id"] == r2["pair_id"] == r2["patch_id"]
        assert r2["country"] == "Austria"
        assert 47 < r2["lat"] < 49 and 12 < r2["lon"] < 14
        assert r2["timestamp"].year == 2017
    lm = label_matrix(m2)
    assert lm.shape == (18, 19) and lm.dtype == bool
    assert (lm[0] == multi_hot(m2.column("labels")[0].as_py())).all()
    b = ds.read_chunk(ds.chunks("s2")[0])
    assert b.meta.column("patch_id").to_pylist() == b.patch_ids
    assert b.meta.to_pylist() == m2.to_pylist()
    assert open_dataset("sample", split="test", include_snow_cloud=False).metadata("s2").num_rows == 6
    assert open_dataset("sample", split="test").metadata("s2").num_rows == 8
    assert open_dataset("sample", include_snow_cloud=True).metadata("s2").num_rows == 24


@pytest.mark.parametrize("chunk_size", [1, 5, 256])
def test_chunks_cover_every_patch_once(chunk_size):
    ds = open_dataset("sample", include_snow_cloud=True, chunk_size=chunk_size)
    for modality in ("s2", "s1"):
        chunks = ds.chunks(modality)
        assert len({c.key for c in chunks}) == len(chunks)
        ids = [p for c in chunks for p in c.patch_ids]
        assert sorted(ids) == sorted(ds.names(modality)) and len(set(ids)) == 24
        ds2 = pickle.loads(pickle.dumps(ds))
        got = [p for c in chunks for p in ds2.read_chunk(pickle.loads(pickle.dumps(c))).patch_ids]
        assert got == ids
        assert ds.metadata(modality).column("patch_id").to_pylist() == ids


def test_chunks_in_worker_processes():
    from concurrent.futures import ProcessPoolExecutor

    ds = open_dataset("sample", chunk_size=4)
    chunks = ds.chunks("s2")
    with ProcessPoolExecutor(2) as ex:
        batches = list(ex.map(ds.read_chunk, chunks))
    assert sum(len(b) for b in batches) == 24
    assert all(isinstance(b, PatchBatch) and not b.skipped for b in batches)


def test_majortom_pairs_and_metadata():
    mt = open_dataset("majortom", ROOT / "majortom")
    m2, m1 = mt.metadata("s2"), mt.metadata("s1")
    assert m2.num_rows == m1.num_rows == 24
    assert m2.column("pair_id").to_pylist() == m1.column("pair_id").to_pylist()
    assert len(set(m2.column("pair_id").to_pylist())) == 24
    assert len(set(m2.column("patch_id").to_pylist())) == 24
    for c in mt.chunks("s2"):
        assert isinstance(c, Chunk) and c.row_group >= 0
    # S1/S2 rows with the same pair_id come from the same BigEarthNet pair
    pairs = {r["patch_id"]: r["s1_name"] for r in pq.read_table(ROOT / "metadata.parquet").to_pylist()
             + pq.read_table(ROOT / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()}
    by_pair = dict(zip(m1.column("pair_id").to_pylist(), m1.column("source_patch_id").to_pylist()))
    for pid, s2name in zip(m2.column("pair_id").to_pylist(), m2.column("source_patch_id").to_pylist()):
        assert by_pair[pid] == pairs[s2name]


def _tiff(data: np.ndarray, transform, crs, nodata=None) -> bytes:
    with MemoryFile() as mf:
        with mf.open(driver="GTiff", height=data.shape[0], width=data.shape[1], count=1, dtype=data.dtype.name,
                     crs=crs, transform=transform, nodata=nodata) as ds:
            ds.write(data, 1)
        return bytes(mf.read())


def write_synthetic_tiles(folder: Path, bad_pixel=(130, 250)):
    """Generated data: real Major TOM tiles are 1068 px; the sample's are 120 px."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    tr10 = from_origin(400000, 4520000, 10, 10)
    tr20 = from_origin(400000, 4520000, 20, 20)
    s1 = {b: rng.uniform(0.001, 0.5, (1068, 1068)).astype(np.float32) for b in ("vv", "vh")}
    s1["vv"][bad_pixel] = -32768
    s2 = {}
    for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"):
        side = 1068 if b in ("B02", "B03", "B04", "B08") else 534
        s2[b] = rng.integers(1, 5000, (side, side)).astype(np.uint16)
    for coll, bands, nodata in (("Core-S1RTC", s1, -32768.0), ("Core-S2L2A", s2, 0)):
        (folder / coll / "images").mkdir(parents=True)
        row = {"product_id": ["P"], "grid_cell": ["454U_120R"], "timestamp": ["2020-07-01 10:00:00"]}
        for b, arr in bands.items():
            row[b] = [_tiff(arr, tr10 if arr.shape[0] == 1068 else tr20, "EPSG:32633", nodata)]
        pq.write_table(pa.table(row), folder / coll / "images" / "part_00001.parquet")
    return s1, s2


def test_majortom_1068_tile_cut_into_the_papers_64_and_invalid_dropped(tmp_path):
    s1, s2 = write_synthetic_tiles(tmp_path)
    mt = open_dataset("majortom", tmp_path, windows="grid")
    b2 = mt.read_chunk(mt.chunks("s2")[0])
    assert len(b2.pixels) == 64 and b2.pixels.coarse.shape == (64, 6, 60, 60) and not b2.skipped
    # window (120, 240) holds pixel (130, 250) set to nodata in S1 vv
    b1 = mt.read_chunk(mt.chunks("s1")[0])
    assert len(b1) == 63 and len(b1.skipped) == 1
    assert b1.skipped[0][0].endswith("/120_240") and "invalid" in b1.skipped[0][1]
    assert "454U_120R/120_240" not in b1.meta.column("pair_id").to_pylist()
    windows = b2.meta.column("window").to_pylist()
    assert windows[9] == [120, 120, 120, 120]
    row = b2.meta.to_pylist()[9]
    np.testing.assert_array_equal(b2.pixels.band("B02")[9], s2["B02"][120:240, 120:240])
    np.testing.assert_array_equal(b2.pixels.band("B05")[9], s2["B05"][60:120, 60:120])  # 20 m band at native size
    i = b1.meta.column("pair_id").to_pylist().index(row["pair_id"])
    np.testing.assert_allclose(b1.pixels.band("VV")[i], 10 * np.log10(s1["vv"][120:240, 120:240]), atol=1e-4)
    assert row["grid_cell"] == "454U_120R" and row["timestamp"].month == 7 and 40 < row["lat"] < 41
    assert mt.metadata("s1").num_rows == 64  # metadata lists every window; reads drop bad ones


def test_query_tile_s2_sizes(tmp_path):
    from rsretrieve.datasets.tile import read_tile

    name = open_dataset("sample").names("s2")[0]
    bands = []
    for b in S2_ALL:
        with rasterio.open(band_path(ROOT, name, "s2", b)) as ds:
            arr = ds.read(1)
            tr, crs = ds.transform, ds.crs
        f = 120 // arr.shape[0]
        bands.append(arr.repeat(f, 0).repeat(f, 1))
    with rasterio.open(band_path(ROOT, name, "s2", "B02")) as ds:
        tr, crs = ds.transform, ds.crs
    stack = np.stack(bands)
    p = tmp_path / "q12.tif"
    with rasterio.open(p, "w", driver="GTiff", height=120, width=120, count=12, dtype="uint16", crs=crs, transform=tr) as ds:
        ds.write(stack)
    q = read_tile(p)
    assert q.modality == "s2" and q.pixels.fine.shape == (1, 10, 120, 120) and not q.resized
    assert q.pixels.fine.dtype == np.uint16 and q.pixels.fine_bands == bands_for("s2")
    np.testing.assert_array_equal(q.pixels.stacked(bands_for("s2")), open_dataset("sample").read_patch(name, "s2").stacked(bands_for("s2")))
    assert 47 < q.lat < 49
    # smaller -> resized to one 120 px patch; larger -> cut
    small = tmp_path / "small.tif"
    with rasterio.open(small, "w", driver="GTiff", height=60, width=60, count=10, dtype="uint16") as ds:
        ds.write(stack[[1, 2, 3, 4, 5, 6, 7, 8, 10, 11], ::2, ::2])
    qs = read_tile(small)
    assert qs.resized and qs.pixels.fine.shape == (1, 10, 120, 120) and qs.lat is None
    big = tmp_path / "big.tif"
    with rasterio.open(big, "w", driver="GTiff", height=250, width=370, count=2, dtype="float32") as ds:
        ds.write(np.full((2, 250, 370), -15.0, np.float32))
    qb = read_tile(big)
    assert qb.modality == "s1" and qb.pixels.fine.shape == (6, 2, 120, 120)


def _stack_folder(folder: Path, out: Path) -> Path:
    """The 120 px multi-band GeoTIFF of a BigEarthNet patch folder, from the same band files."""
    name = folder.name
    bands = ("VV", "VH") if (folder / f"{name}_VV.tif").exists() else S2_ALL
    arrays = []
    for b in bands:
        with rasterio.open(folder / f"{name}_{b}.tif") as ds:
            arr = ds.read(1)
            if arr.shape[0] == 120:
                tr, crs = ds.transform, ds.crs
        f = 120 // arr.shape[0]
        arrays.append(arr.repeat(f, 0).repeat(f, 1))
    stack = np.stack(arrays)
    with rasterio.open(out, "w", driver="GTiff", height=120, width=120, count=len(bands), dtype=stack.dtype.name,
                       crs=crs, transform=tr) as ds:
        ds.write(stack)
    return out


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_query_tile_from_patch_folder_equals_stacked_geotiff(tmp_path, modality):
    from rsretrieve.datasets.tile import read_tile

    name = open_dataset("sample").names(modality)[0]
    folder = band_path(ROOT, name, modality, "VV" if modality == "s1" else "B02").parent
    q = read_tile(folder)
    g = read_tile(_stack_folder(folder, tmp_path / "stack.tif"))
    order = bands_for(modality)
    assert q.modality == g.modality == modality and q.pixels.stacked(order).shape == (1, len(order), 120, 120)
    np.testing.assert_array_equal(q.pixels.stacked(order), g.pixels.stacked(order))
    np.testing.assert_array_equal(q.pixels.fine, open_dataset("sample").read_patch(name, modality).fine)
    assert (q.windows, q.resized, q.crs, q.lat, q.lon, q.patch_latlon) == (g.windows, g.resized, g.crs, g.lat, g.lon, g.patch_latlon)
    assert q.lat is not None and 40 < q.lat < 70
    assert len(read_tile(str(folder), modality).pixels) == len(q.pixels)


def _assert_header_meta_equals_full(mt, modality, monkeypatch):
    """Header-only candidates (no pixel decoding) == the full read's metadata on valid windows."""
    import rsretrieve.datasets.majortom as majortom

    real = majortom.decode_band
    modes = []

    def spy(data, where, *, header_only=False):
        modes.append(header_only)
        return real(data, where, header_only=header_only)

    monkeypatch.setattr(majortom, "decode_band", spy)
    chunks = mt.chunks(modality)
    meta = mt.metadata(modality)
    assert modes and all(modes) and len(modes) == len(chunks)  # one header per tile, no pixels
    monkeypatch.setattr(majortom, "decode_band", real)
    full = [mt.read_chunk(c) for c in chunks]
    for chunk, batch in zip(chunks, full):
        assert chunk.n_patches == mt.read_chunk(chunk, _header_only=True).meta.num_rows
    rows = {r["patch_id"]: r for r in meta.to_pylist()}
    full_rows = sum((b.meta.to_pylist() for b in full), [])
    assert full_rows and all(rows[r["patch_id"]] == r for r in full_rows)
    skipped = {pid for b in full for pid, _ in b.skipped}
    assert set(rows) == {r["patch_id"] for r in full_rows} | skipped
    return meta, full


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_majortom_header_only_metadata_equals_full_read_sample(modality, monkeypatch, tmp_path):
    import shutil

    shutil.copytree(ROOT / "majortom", tmp_path / "mt", ignore=shutil.ignore_patterns("metadata.parquet"))  # the header path
    meta, full = _assert_header_meta_equals_full(open_dataset("majortom", tmp_path / "mt"), modality, monkeypatch)
    assert meta.num_rows == 24 and sum(len(b) for b in full) == 24


@pytest.mark.parametrize("tile_size", [None, 1068])
def test_majortom_header_only_metadata_equals_full_read_1068(tmp_path, tile_size, monkeypatch):
    write_synthetic_tiles(tmp_path)
    mt = open_dataset("majortom", tmp_path, tile_size=tile_size)
    # Major TOM's fragmenter: 100 windows; the bad S1 pixel (130, 250) lies in one of them, (105, 210)
    for modality, valid in (("s2", 100), ("s1", 99)):
        meta, full = _assert_header_meta_equals_full(mt, modality, monkeypatch)
        assert meta.num_rows == 100 and sum(len(b) for b in full) == valid
