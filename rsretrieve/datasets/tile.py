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
  (converted to dB) when no value is negative (`s1_units="auto"`) or when told so.
- Size: smaller than 120 px on a side -> the whole tile is resized to 120 x 120 (bilinear);
  otherwise cut into floor(H/120) x floor(W/120) patches of 120 px (partial edges dropped). Each
  patch is embedded; a query uses the mean of its patch embeddings.
- Invalid pixels (NaN/inf, the declared nodata; S1 non-positive linear power): patches with any are
  dropped (listed in `skipped`); if none is left, DataError.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.bands import PATCH_SIZE as PATCH, S1_BANDS, S2_BANDS, Modality
from rsretrieve.preprocess import RawPixels
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


def _read_geotiff(path: Path, modality: Modality | None, where: str):
    """(data (C, H, W) in `S1_BANDS` / `S2_BANDS` order, modality, nodata, transform, crs) of a
    multi-band GeoTIFF."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
        with ds:
            n = ds.count
            descs = list(ds.descriptions)
            dtypes = set(ds.dtypes)
            nodata = ds.nodata
            transform, crs = ds.transform, ds.crs
            detected = _detect(n)
            if detected is None:
                raise DataError(located(where, f"has {n} band(s); expected 2 (Sentinel-1 VV, VH) or 10/12 (Sentinel-2)"))
            if modality is not None and modality != detected:
                raise DataError(located(where, f"has {n} bands ({_NAMES[detected]}) but --modality {modality} was given"))
            modality = detected
            dtype = np.dtype(dtypes.pop()) if len(dtypes) == 1 else None
            if dtype is None:
                raise DataError(located(where, f"mixed band dtypes {sorted(set(ds.dtypes))}"))
            if modality == "s1" and dtype.kind != "f":
                raise DataError(located(where, f"Sentinel-1 tile has dtype {dtype}; expected float32 (dB or linear power)"))
            if modality == "s2" and (dtype.kind not in "uif" or dtype.itemsize < 2):
                raise DataError(located(where, f"Sentinel-2 tile has dtype {dtype}; expected uint16 reflectance DN"))
            idx = _order(descs, modality, n, where)
            data = ds.read([i + 1 for i in idx])  # native dtype: integer S2 digital numbers stay integers
    except DataError:
        raise
    except (RasterioError, OSError, ValueError) as e:
        raise DataError(located(where, f"unreadable GeoTIFF ({' '.join(str(e).split())})")) from None
    return data, modality, nodata, transform, crs


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
    S1 in dB as in the release) read like the 120 px GeoTIFF stacked from it."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        pixels, modality, transform, crs = _read_patch_folder(path, modality, where)
        wins, resized, skipped = [(0, 0, PATCH, PATCH)], False, []
        h = w = PATCH
    elif not path.is_file():
        raise DataError(located(where, "file not found"))
    else:
        data, modality, nodata, transform, crs = _read_geotiff(path, modality, where)
        pixels, wins, resized, skipped = _cut(data, modality, nodata, s1_units, path, where)
        h, w = data.shape[1:]

    lat = lon = None
    patch_latlon = None
    crs_s = crs.to_string() if crs is not None else None
    if crs is not None:
        from rsretrieve.geo import pixel_to_xy, to_wgs84

        pts = [(w / 2.0, h / 2.0)] + [(c + ww / 2.0, r + hh / 2.0) for r, c, hh, ww in wins]
        xs, ys = zip(*[pixel_to_xy(transform, *p) for p in pts])
        try:
            la, lo = to_wgs84(crs, list(xs), list(ys))
            lat, lon = float(la[0]), float(lo[0])
            patch_latlon = list(zip(la[1:].tolist(), lo[1:].tolist()))
        except Exception:
            pass
    return QueryTile(pixels, modality, str(path), wins, resized, crs_s, lat, lon, patch_latlon, skipped)


def _cut(data: np.ndarray, modality: Modality, nodata, s1_units: str, path: Path, where: str):
    """Raw 120 px patches of a tile (C, H, W): (RawPixels, windows, resized, skipped). S1 linear
    power becomes dB; S2 integer digital numbers stay uint16."""
    integer_dn = modality == "s2" and data.dtype.kind in "ui"
    data = data.astype(np.float64 if modality == "s1" else np.float32)
    invalid = ~np.isfinite(data).all(axis=0)
    if nodata is not None and np.isfinite(nodata):
        invalid |= (data == nodata).any(axis=0)
    if modality == "s1":
        finite = data[np.isfinite(data)]
        linear = s1_units == "linear" or (s1_units == "auto" and finite.size and finite.min() >= 0)
        if linear:
            invalid |= (data <= 0).any(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                data = 10.0 * np.log10(np.where(data > 0, data, 1.0))
    data = np.where(invalid[None], 0, data).astype(np.float32)

    h, w = data.shape[1:]
    bands = S1_BANDS if modality == "s1" else S2_BANDS
    skipped: list[tuple[str, str]] = []
    if h < PATCH or w < PATCH:
        if invalid.any():
            raise DataError(located(where, f"{int(invalid.sum())} invalid pixel(s) (NaN, inf or nodata)"))
        return RawPixels(bilinear_resize(data, PATCH)[None], bands), [(0, 0, h, w)], True, skipped
    patches, wins = [], []
    for r in range(0, h - PATCH + 1, PATCH):
        for c in range(0, w - PATCH + 1, PATCH):
            bad = int(invalid[r : r + PATCH, c : c + PATCH].sum())
            if bad:
                skipped.append((f"{path.name}:{r}_{c}", located(where, f"window {r},{c}: {bad} invalid pixel(s) (NaN, inf or nodata)")))
                continue
            patches.append(data[:, r : r + PATCH, c : c + PATCH])
            wins.append((r, c, PATCH, PATCH))
    if not patches:
        raise DataError(located(where, f"every 120 px patch has invalid pixels (NaN, inf or nodata); {len(skipped)} dropped"))
    stacked = np.stack(patches)
    return RawPixels(stacked.astype(np.uint16) if integer_dn else stacked, bands), wins, False, skipped
