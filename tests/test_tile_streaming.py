"""Query tiles are read one 120-row window at a time: same patches as a whole read, bounded memory."""

import tracemalloc

import numpy as np
import pytest
import rasterio
from rasterio.env import getenv, hasenv
from rasterio.io import DatasetReader
from rasterio.transform import from_origin
from rasterio.windows import Window

from rsretrieve.bands import S2_BANDS
from rsretrieve.datasets.tile import S2_12, open_tile, read_tile
from rsretrieve.geo import pixel_to_xy, to_wgs84

PATCH = 120
TRANSFORM = from_origin(500_000, 5_300_000, 10, 10)


def _write_in_windows(path, bands: int, height: int, width: int, dtype: str, rows, **profile) -> None:
    """A GeoTIFF written 120 rows at a time: `rows(row, h)` gives (bands, h, width)."""
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=bands, dtype=dtype, **profile) as ds:
        for row in range(0, height, PATCH):
            h = min(PATCH, height - row)
            ds.write(rows(row, h), window=Window(0, row, width, h))


class ReadLog(list):
    """The windows read, as (row, col, h, w); `caches`: the GDAL block-cache cap during each read."""

    def __init__(self):
        super().__init__()
        self.caches: list = []


@pytest.fixture
def read_spy(monkeypatch) -> ReadLog:
    """Every read through rasterio's DatasetReader.read."""
    reads = ReadLog()
    real = DatasetReader.read

    def spy(self, indexes=None, out=None, window=None, *args, **kwargs):
        w = window if window is not None else Window(0, 0, self.width, self.height)
        reads.append((int(w.row_off), int(w.col_off), int(w.height), int(w.width)))
        reads.caches.append(getenv().get("GDAL_CACHEMAX") if hasenv() else None)
        return real(self, indexes, out, window, *args, **kwargs)

    monkeypatch.setattr(DatasetReader, "read", spy)
    return reads


def test_s2_strips_equal_the_tile_read_window_by_window(tmp_path, read_spy):
    # 12 bands uint16, nodata 0; partial edges (1000 rows, 1250 columns) hold no patch
    height, width = 1000, 1250
    path = tmp_path / "s2.tif"
    # (row, col, band): B03 and B02 inside the grid; B01 and B09 (dropped bands) and the partial edges don't count
    poisoned = {(130, 250, 3), (700, 1190, 1), (300, 300, 0), (500, 500, 9), (995, 10, 5), (40, 1230, 11)}

    def rows(row, h):
        grid = np.arange(row, row + h)[:, None] * 7 + np.arange(width)[None, :] * 3
        block = np.stack([(grid + b * 1000) % 60000 + 1 for b in range(12)]).astype(np.uint16)
        for r, c, b in poisoned:
            if row <= r < row + h:
                block[b, r - row, c] = 0
        return block

    _write_in_windows(path, 12, height, width, "uint16", rows, nodata=0, crs="EPSG:32633", transform=TRANSFORM)

    reader = open_tile(path)
    assert read_spy == []  # the header only
    assert (reader.modality, reader.height, reader.width, reader.n_patches) == ("s2", height, width, 80)
    assert reader.crs == "EPSG:32633" and not reader.resized and 47 < reader.lat < 48

    strips = list(reader.iter_patches())
    assert read_spy == [(row, 0, PATCH, width) for row in range(0, 960, PATCH)]  # one full-width strip per row of patches
    skipped = [name for s in strips for name, _ in s.skipped]
    assert skipped == ["s2.tif:120_240", "s2.tif:600_1080"]
    assert all(reason.startswith(f"{path}: window ") for s in strips for _, reason in s.skipped)
    expected = [(r, c, PATCH, PATCH) for r in range(0, 960, PATCH) for c in range(0, 1200, PATCH)
                if f"s2.tif:{r}_{c}" not in skipped]
    assert [w for s in strips for w in s.windows] == expected

    file_bands = [S2_12.index(b) + 1 for b in S2_BANDS]  # B01 and B09 dropped
    pixels = np.concatenate([s.pixels.fine for s in strips])
    assert pixels.dtype == np.uint16 and pixels.shape == (78, 10, PATCH, PATCH)
    with rasterio.open(path) as ds:
        for patch, (r, c, h, w) in zip(pixels, expected):
            np.testing.assert_array_equal(patch, ds.read(file_bands, window=Window(c, r, w, h)))

    centres = [pixel_to_xy(TRANSFORM, c + w / 2, r + h / 2) for r, c, h, w in expected]
    lat, lon = to_wgs84("EPSG:32633", [x for x, _ in centres], [y for _, y in centres])
    assert [p for s in strips for p in s.latlon] == list(zip(lat.tolist(), lon.tolist()))

    whole = read_tile(path)  # the gathered form: the same patches, windows, skips and coordinates
    np.testing.assert_array_equal(whole.pixels.fine, pixels)
    assert (whole.windows, [n for n, _ in whole.skipped]) == (expected, skipped)
    assert whole.patch_latlon == list(zip(lat.tolist(), lon.tolist())) and (whole.lat, whole.lon) == (reader.lat, reader.lon)
    assert max(h for _, _, h, _ in read_spy) == PATCH  # never a window taller than one row of patches


def test_gdal_block_cache_is_capped_per_read_unless_the_user_set_it(tmp_path, read_spy):
    # 512 px blocks: GDAL may keep one row of blocks (and a strip) of decoded pixels, not the tile
    path = tmp_path / "tiled.tif"
    _write_in_windows(path, 10, 600, 2048, "uint16", lambda row, h: np.ones((10, h, 2048), np.uint16),
                      tiled=True, blockxsize=512, blockysize=512, compress="deflate")
    list(open_tile(path).iter_patches())
    assert read_spy.caches == [(512 + PATCH) * 2048 * 10 * 2] * 5
    assert not (hasenv() and "GDAL_CACHEMAX" in getenv())  # only while reading
    read_spy.caches = []
    with rasterio.Env(GDAL_CACHEMAX=64 << 20):
        list(open_tile(path).iter_patches())
    assert read_spy.caches == [64 << 20] * 5


def test_memory_stays_near_one_strip(tmp_path):
    # 2400 x 2400 px, 10 bands uint16: 115 MB raw; reading it whole (the old reader) peaks at ~8x that
    size, bands = 2400, 10
    path = tmp_path / "big.tif"
    rng = np.random.default_rng(0)
    _write_in_windows(path, bands, size, size, "uint16", lambda row, h: rng.integers(1, 10000, (bands, h, size), np.uint16))
    raw_bytes = bands * size * size * 2

    tracemalloc.start()
    try:
        n = 0
        for strip in open_tile(path).iter_patches():
            n += len(strip.pixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == (size // PATCH) ** 2
    assert peak < raw_bytes / 4, f"peak {peak / 1e6:.1f} MB for a {raw_bytes / 1e6:.1f} MB tile"


@pytest.mark.parametrize("negative_at, linear", [(None, True), ((300, 17), False), ((365, 200), False)])
def test_s1_auto_units_look_at_every_strip(tmp_path, read_spy, negative_at, linear):
    # 370 rows: three strips of patches and 10 partial rows; a negative value anywhere (the last
    # strip, or the partial rows no patch covers) means dB, as the whole-tile rule did
    height, width = 370, 250
    rng = np.random.default_rng(1)
    data = rng.gamma(2.0, 0.05, (2, height, width)).astype(np.float32) + 1e-4
    if negative_at is not None:
        data[1, negative_at[0], negative_at[1]] = -0.5
    path = tmp_path / "s1.tif"
    _write_in_windows(path, 2, height, width, "float32", lambda row, h: data[:, row : row + h])

    strips = list(open_tile(path).iter_patches())
    pixels = np.concatenate([s.pixels.fine for s in strips])
    windows = [w for s in strips for w in s.windows]
    assert windows == [(r, c, PATCH, PATCH) for r in (0, 120, 240) for c in (0, 120)]
    want = np.stack([data[:, r : r + PATCH, c : c + PATCH] for r, c, _, _ in windows])
    if linear:
        want = (10.0 * np.log10(want.astype(np.float64))).astype(np.float32)
    np.testing.assert_array_equal(pixels, want)
    assert all(h <= PATCH and w == width for _, _, h, w in read_spy)
    np.testing.assert_array_equal(read_tile(path).pixels.fine, pixels)
