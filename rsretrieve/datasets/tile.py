"""Single-tile reader for queries: one multi-band GeoTIFF -> raw 120 px patches (`RawPixels`).

A BigEarthNet patch folder (`BigEarthNet-S1/<product>/<s1_name>/`, `BigEarthNet-S2/<product>/<patch_id>/`)
is a query tile too: S1 when it holds `<folder>_VV.tif` and `_VH.tif` (dB), S2 when it holds
`<folder>_B02.tif` ... `_B12.tif`; its bands are read with the BigEarthNet-v2 reader (20 m bands
nearest-upsampled) and give the same `QueryTile` as the 120 px GeoTIFF stacked from them. A given
`modality` that contradicts the folder, or a folder with neither set of files, is a DataError.

Rules (GeoTIFF):
- Modality from the band count: 2 bands -> S1 (VV, VH), 10 or 12 bands -> S2; anything else is a
  DataError. A given `modality` that contradicts the count is a DataError.
- Band order: band descriptions when they name the bands (e.g. "B04", "VV"); otherwise position
  (S2 10 bands: B02 B03 B04 B05 B06 B07 B08 B8A B11 B12; 12 bands: B01 B02 ... B8A B09 B11 B12,
  B01 and B09 dropped; S1: VV, VH).
- dtype: S2 integer or float DN (uint8 and complex are rejected); S1 float, in dB, or linear power
  (converted to dB) when no value is negative (`s1_units="auto"`) or when told so. (A BigEarthNet
  patch folder follows `benv2_patch.assemble`: integer S1 dB and 20 m bands at 120 px are read.)
- Size: smaller than 120 px on a side -> the whole tile is resized to 120 x 120 (bilinear);
  otherwise cut into floor(H/120) x floor(W/120) patches of 120 px (partial edges dropped). Each
  patch is embedded; a query uses the mean of its patch embeddings.
- Invalid pixels (NaN/inf, the declared nodata; S1 non-positive linear power): patches with any are
  dropped (listed in `skipped`); if none is left, DataError.
- Untrusted headers and values (`datasets.limits`): a declared size above the cap (width x height,
  2**28 px by default, `--max-tile-pixels`) is a DataError before any pixel is allocated; a kept
  patch's value outside the physical range (S2 DN -1,000 .. 100,000; S1 -100 .. +100 dB) is a
  DataError for the tile (1e30 "reflectance" gave non-finite embeddings and no result).

Reading (so memory stays near one 120 px row of patches, not the tile: a full 10,980 px S2 tile is
2.4 GB raw): `open_tile` reads the header only; `TileReader.iter_patches` reads a GeoTIFF of at
least 120 px one strip of 120 rows at a time (rasterio windows) and yields that row's valid patches.
S1 `s1_units="auto"` needs one more pass first, over every row of the tile (partial edges too, as
the rule says "no value"), to see whether any finite value is negative. A tile smaller than 120 px
is read whole (it is resized as a whole); a patch folder holds one patch. `read_tile` gathers the
strips into one `QueryTile`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rsretrieve.bands import PATCH_SIZE as PATCH, S1_BANDS, S2_BANDS, Modality
from rsretrieve.pixels import RawPixels
from rsretrieve.datasets.limits import check_range, check_size
from rsretrieve.errors import DataError, located

S2_12 = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
_NAMES = {"s1": "Sentinel-1", "s2": "Sentinel-2"}


@dataclass
class QueryTile:
    pixels: RawPixels  # P patches of 120 px, raw (S2 digital numbers, S1 dB); the model normalises
    modality: Modality
    path: str
    windows: list[tuple[int, int, int, int]]  # (row, col, h, w) of each patch in the source tile
    resized: bool  # True if the tile was smaller than 120 px and resized
    crs: str | None = None
    lat: float | None = None  # tile centre, WGS84, when georeferenced
    lon: float | None = None
    patch_latlon: list[tuple[float, float]] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def bilinear_resize(x: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size), bilinear, half-pixel centres (align_corners=False)."""
    c, h, w = x.shape

    def coords(n_in: int):
        pos = (np.arange(size) + 0.5) * n_in / size - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bot = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return (top * (1 - fy)[:, None] + bot * fy[:, None]).astype(np.float32)


def _detect(n: int) -> Modality | None:
    return "s1" if n == 2 else "s2" if n in (10, 12) else None


def _order(descs: list[str], modality: Modality, n: int, where: str) -> list[int]:
    """Indices (0-based) of the model's bands in the file."""
    want = S1_BANDS if modality == "s1" else S2_BANDS
    norm = [(d or "").strip().upper().replace("B8A", "B8A") for d in descs]
    norm = [("B0" + d[1:] if len(d) == 2 and d.startswith("B") and d[1].isdigit() else d) for d in norm]
    if all(w in norm for w in want):
        return [norm.index(w) for w in want]
    if modality == "s1":
        return [0, 1]
    if n == 10:
        return list(range(10))
    return [S2_12.index(b) for b in S2_BANDS]


WindowBox = tuple[int, int, int, int]  # (row, col, h, w) of a patch in the source tile


class PatchStrip(NamedTuple):
    """One row of 120 px patches of a tile (a whole small or folder tile is one strip)."""

    pixels: RawPixels  # the row's valid patches (none when every one was dropped)
    windows: list[WindowBox]  # theirs, in order
    skipped: list[tuple[str, str]]  # (name, one-line reason) of the row's dropped patches
    latlon: list[tuple[float, float]] | None  # WGS84 centres of `windows`, when georeferenced


@contextmanager
def _unreadable(where: str):
    """Rasterio's and GDAL's read errors as one-line DataErrors."""
    from rasterio.errors import RasterioError

    try:
        yield
    except (RasterioError, OSError, ValueError) as e:
        raise DataError(located(where, f"unreadable GeoTIFF ({' '.join(str(e).split())})")) from None


def _open_dataset(path: Path, where: str):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with _unreadable(where), warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path)


def _block_cache(ds) -> dict:
    """GDAL options that cap its block cache near what one strip needs: the rows of blocks a
    120-row window touches, and one strip more. GDAL keeps every decoded block up to its default
    cap (5 % of RAM), which on a 2.4 GB tile is most of the memory a strip-wise read saves; one
    row of blocks is all that sequential strips reuse. A GDAL_CACHEMAX the user set is kept."""
    from rasterio.env import getenv, hasenv

    if "GDAL_CACHEMAX" in os.environ or (hasenv() and "GDAL_CACHEMAX" in getenv()):
        return {}
    block_rows = ds.block_shapes[0][0] if ds.block_shapes else 1
    row_bytes = ds.width * ds.count * max(np.dtype(t).itemsize for t in ds.dtypes)
    # at least 16 MiB: GDAL reads a value below 100,000 as megabytes
    return {"GDAL_CACHEMAX": max((block_rows + PATCH) * row_bytes, 16 << 20)}


def _read_window(ds, indexes: list[int], row: int, height: int, where: str) -> np.ndarray:
    """(C, height, W) of the bands `indexes` (1-based), rows row .. row + height, native dtype."""
    import rasterio
    from rasterio.windows import Window

    # the cap holds for this read only: a generator must not leave an Env open across its yields
    with _unreadable(where), rasterio.Env(**_block_cache(ds)):
        return ds.read(indexes, window=Window(0, row, ds.width, height))


def _check_header(ds, modality: Modality | None, where: str) -> tuple[Modality, np.dtype, list[int]]:
    """(modality, dtype, 1-based band indexes in `S1_BANDS` / `S2_BANDS` order) of a multi-band GeoTIFF."""
    n = ds.count
    detected = _detect(n)
    if detected is None:
        raise DataError(located(where, f"has {n} band(s); expected 2 (Sentinel-1 VV, VH) or 10/12 (Sentinel-2)"))
    if modality is not None and modality != detected:
        raise DataError(located(where, f"has {n} bands ({_NAMES[detected]}) but --modality {modality} was given"))
    dtypes = set(ds.dtypes)
    if len(dtypes) != 1:
        raise DataError(located(where, f"mixed band dtypes {sorted(dtypes)}"))
    dtype = np.dtype(dtypes.pop())
    if detected == "s1" and dtype.kind != "f":
        raise DataError(located(where, f"Sentinel-1 tile has dtype {dtype}; expected float32 (dB or linear power)"))
    if detected == "s2" and (dtype.kind not in "uif" or dtype.itemsize < 2):
        raise DataError(located(where, f"Sentinel-2 tile has dtype {dtype}; expected uint16 reflectance DN"))
    return detected, dtype, [i + 1 for i in _order(list(ds.descriptions), detected, n, where)]


def _wgs84(transform, crs, points: list[tuple[float, float]]) -> list[tuple[float, float]] | None:
    """(lat, lon) of pixel positions (col, row); None when the CRS cannot be projected."""
    from rsretrieve.geo import pixel_to_xy, to_wgs84

    if crs is None or not points:
        return None if crs is None else []
    xs, ys = zip(*[pixel_to_xy(transform, *p) for p in points])
    try:
        lat, lon = to_wgs84(crs, list(xs), list(ys))
    except Exception:  # a CRS PROJ cannot take to WGS84: the tile simply has no coordinates
        return None
    return list(zip(lat.tolist(), lon.tolist()))


def _invalid(raw: np.ndarray, work: type, nodata, linear: bool) -> np.ndarray:
    """(H, W) True where any band is NaN/inf, the nodata value, or (S1 linear) not positive. Band
    by band in the working dtype the whole-tile reader compared in (float32 S2, float64 S1), so
    the same pixels are invalid and only one band's copy is alive."""
    invalid = np.zeros(raw.shape[1:], bool)
    for band in raw:
        values = band.astype(work)
        invalid |= ~np.isfinite(values)
        if nodata is not None and np.isfinite(nodata):
            invalid |= values == nodata
        if linear:
            invalid |= values <= 0
    return invalid


class TileReader:
    """A query tile opened for reading: header facts now, pixels strip by strip (`iter_patches`).

    Attributes: path, modality, height, width, crs (string or None), lat/lon of the centre (WGS84,
    or None), resized (smaller than 120 px: one patch, resized), n_patches (patches the grid holds,
    before invalid ones are dropped)."""

    def __init__(self, path: Path, modality: Modality, height: int, width: int, transform, crs, *,
                 indexes: list[int] | None = None, dtype: np.dtype | None = None, nodata=None,
                 s1_units: str = "auto", folder_pixels: RawPixels | None = None):
        self.path, self._where = path, str(path)
        self.modality: Modality = modality
        self.height, self.width = height, width
        self.transform, self._crs = transform, crs
        self.crs: str | None = crs.to_string() if crs is not None else None
        self._indexes, self._dtype, self._nodata = indexes, dtype, nodata
        self._s1_units = s1_units
        self._is_linear: bool | None = None
        self._folder_pixels = folder_pixels
        centre = _wgs84(transform, crs, [(width / 2.0, height / 2.0)])
        self.lat, self.lon = centre[0] if centre else (None, None)

    @property
    def resized(self) -> bool:
        return self._folder_pixels is None and (self.height < PATCH or self.width < PATCH)

    @property
    def n_patches(self) -> int:
        return 1 if self.resized else (self.height // PATCH) * (self.width // PATCH)

    @property
    def bands(self) -> tuple[str, ...]:
        return S1_BANDS if self.modality == "s1" else S2_BANDS

    def iter_patches(self) -> Iterator[PatchStrip]:
        """The tile's valid patches, one row of 120 px patches at a time (a GeoTIFF of at least
        120 px is read one 120-row window at a time). DataError at the end if none was valid."""
        if self._folder_pixels is not None:
            wins = [(0, 0, PATCH, PATCH)]
            yield PatchStrip(self._folder_pixels, wins, [], self._latlon(wins))
            return
        if self.resized:
            yield self._small()
            return
        self._linear()  # S1 "auto": the pre-pass over the whole tile, before the strips
        valid = dropped = 0
        with _open_dataset(self.path, self._where) as ds:
            for row in range(0, self.height - PATCH + 1, PATCH):
                strip = self._cut_strip(_read_window(ds, self._indexes, row, PATCH, self._where), row)
                valid += len(strip.windows)
                dropped += len(strip.skipped)
                yield strip
        if not valid:
            raise DataError(located(self._where, f"every 120 px patch has invalid pixels (NaN, inf or nodata); {dropped} dropped"))

    # -- internals --------------------------------------------------------------------------------
    def _work(self) -> type:
        return np.float64 if self.modality == "s1" else np.float32

    def _scan_linear(self) -> bool:
        """Whether S1 values are linear power (to convert to dB): told so, or ("auto") when the
        tile has a finite value and none is negative. The auto check reads every row of the tile,
        one 120-row window at a time, and stops at the first negative value."""
        if self.modality != "s1" or self._s1_units != "auto":
            return self.modality == "s1" and self._s1_units == "linear"
        any_finite = False
        with _open_dataset(self.path, self._where) as ds:
            for row in range(0, self.height, PATCH):
                raw = _read_window(ds, self._indexes, row, min(PATCH, self.height - row), self._where)
                for band in raw:
                    values = band.astype(np.float64)
                    finite = np.isfinite(values)
                    if (finite & (values < 0)).any():
                        return False
                    any_finite = any_finite or bool(finite.any())
        return any_finite

    def _latlon(self, wins: list[WindowBox]) -> list[tuple[float, float]] | None:
        return _wgs84(self.transform, self._crs, [(c + w / 2.0, r + h / 2.0) for r, c, h, w in wins])

    def _cut_strip(self, raw: np.ndarray, row: int) -> PatchStrip:
        """The valid 120 px patches of one strip (C, 120, W) starting at tile row `row`."""
        linear = self._linear()
        invalid = _invalid(raw, self._work(), self._nodata, linear)
        integer_dn = self.modality == "s2" and self._dtype.kind in "ui"
        wins, skipped = [], []
        for c in range(0, self.width - PATCH + 1, PATCH):
            bad = int(invalid[:, c : c + PATCH].sum())
            if bad:
                reason = located(self._where, f"window {row},{c}: {bad} invalid pixel(s) (NaN, inf or nodata)")
                skipped.append((f"{self.path.name}:{row}_{c}", reason))
            else:
                wins.append((row, c, PATCH, PATCH))
        out = np.empty((len(wins), raw.shape[0], PATCH, PATCH), np.uint16 if integer_dn else np.float32)
        for i, (_, c, _, _) in enumerate(wins):
            patch = raw[:, :, c : c + PATCH]
            if integer_dn:  # through float32 to uint16, as the whole-tile reader cast other integer DN
                out[i] = patch.astype(np.float32)
            elif linear:  # linear power -> dB in float64, then float32
                out[i] = 10.0 * np.log10(patch.astype(np.float64))
            else:
                out[i] = patch
            if self.modality == "s2":  # raw values, before a cast to uint16 could wrap them
                check_range(f"{self._where} window {row},{c}", patch, "s2")
        if self.modality == "s1":
            check_range(self._where, out, "s1")
        return PatchStrip(RawPixels(out, self.bands), wins, skipped, self._latlon(wins))

    def _linear(self) -> bool:
        if self._is_linear is None:  # one pre-pass per reader, however often it is iterated
            self._is_linear = self._scan_linear()
        return self._is_linear

    def _small(self) -> PatchStrip:
        """A tile smaller than 120 px on a side: read whole (it is resized as a whole), one patch."""
        linear = self._linear()
        with _open_dataset(self.path, self._where) as ds:
            raw = _read_window(ds, self._indexes, 0, self.height, self._where)
        invalid = _invalid(raw, self._work(), self._nodata, linear)
        if invalid.any():
            raise DataError(located(self._where, f"{int(invalid.sum())} invalid pixel(s) (NaN, inf or nodata)"))
        data = raw.astype(self._work())
        if linear:
            data = 10.0 * np.log10(data)
        check_range(self._where, data, self.modality)
        wins = [(0, 0, self.height, self.width)]
        return PatchStrip(RawPixels(bilinear_resize(data.astype(np.float32), PATCH)[None], self.bands), wins, [], self._latlon(wins))


def open_tile(path: Path | str, modality: Modality | None = None, s1_units: str = "auto", *,
              max_pixels: int | None = None) -> TileReader:
    """A query tile (a multi-band GeoTIFF, or a BigEarthNet patch folder) opened for reading: its
    header is checked now (band count, modality, dtype, declared size against `max_pixels`,
    default `limits.max_pixels()`: DataError), its pixels are read by `TileReader.iter_patches`.
    A patch folder's one 120 px patch is read now (it is small)."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        pixels, modality, transform, crs = _read_patch_folder(path, modality, where)
        return TileReader(path, modality, PATCH, PATCH, transform, crs, folder_pixels=pixels)
    if not path.is_file():
        raise DataError(located(where, "file not found"))
    with _open_dataset(path, where) as ds, _unreadable(where):
        detected, dtype, indexes = _check_header(ds, modality, where)
        check_size(where, ds.height, ds.width, ds.count, dtype, max_pixels)
        return TileReader(path, detected, ds.height, ds.width, ds.transform, ds.crs,
                          indexes=indexes, dtype=dtype, nodata=ds.nodata, s1_units=s1_units)


def _read_patch_folder(path: Path, modality: Modality | None, where: str):
    """(raw pixels of one patch, modality, transform, crs) of a BigEarthNet patch folder: S1 when it
    holds `<folder>_VV.tif`/`_VH.tif`, S2 when it holds `<folder>_B02.tif` ... (20 m bands at 60 px)."""
    from rasterio.errors import NotGeoreferencedWarning

    from rsretrieve.datasets.benv2_patch import read_patch_folder, stack_raw

    name = path.name
    found = [m for m, bands in (("s1", S1_BANDS), ("s2", S2_BANDS))
             if any((path / f"{name}_{b}.tif").is_file() for b in bands)]
    if not found:
        raise DataError(located(where, f"not a BigEarthNet patch folder: no {name}_VV.tif/{name}_VH.tif (Sentinel-1) "
                                       f"or {name}_B02.tif ... (Sentinel-2) in it"))
    if len(found) == 2:
        raise DataError(located(where, "holds both Sentinel-1 (VV, VH) and Sentinel-2 band files; expected one patch"))
    detected = found[0]
    if modality is not None and modality != detected:
        bands = "VV, VH" if detected == "s1" else "B02 ... B12"
        raise DataError(located(where, f"is a {_NAMES[detected]} patch folder ({bands}) but --modality {modality} was given"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        raw, transform, crs = read_patch_folder(path, detected)
    return stack_raw([raw], detected), detected, transform, crs


def read_tile(path: Path | str, modality: Modality | None = None, *, s1_units: str = "auto") -> QueryTile:
    """A query tile: a multi-band GeoTIFF, or a BigEarthNet patch folder (its single-band GeoTIFFs,
    S1 in dB as in the release) read like the 120 px GeoTIFF stacked from it. Every valid patch in
    memory at once: a large tile's queries go through `open_tile(...).iter_patches()` instead."""
    reader = open_tile(path, modality, s1_units)
    strips = list(reader.iter_patches())
    kept = [s for s in strips if len(s.pixels)]
    pixels = RawPixels.concat([s.pixels for s in kept])
    wins = [w for s in strips for w in s.windows]
    skipped = [x for s in strips for x in s.skipped]
    lat, lon = reader.lat, reader.lon
    patch_latlon = None
    if reader.crs is not None:
        parts = [s.latlon for s in strips]
        if lat is None or any(p is None for p in parts):
            lat = lon = None  # as before: a tile whose points cannot all be projected has none
        else:
            patch_latlon = [p for part in parts for p in part]
    return QueryTile(pixels, reader.modality, str(reader.path), wins, reader.resized, reader.crs, lat, lon, patch_latlon, skipped)
