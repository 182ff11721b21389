"""One BigEarthNet-v2 patch's bands, read and checked: from its GeoTIFF folder or an LMDB value.

Raw values (`pixels.RawPixels`): S2 digital numbers as uint16, the 10 m bands at 120 px and the
20 m bands at their native 60 px; S1 backscatter in dB as float32. Anything else (a missing band,
a wrong shape or dtype, NaN) is a one-line `DataError` naming the file.

Two variants that TorchGeo reads (its BigEarthNetV2 test fixture has both) are converted, and each
conversion is named in the `converted` list a reader passes (the encode summary counts them):
- S1 as 8/16-bit integers: converted to float32, values unchanged (each is exact in float32).
- 20 m bands delivered at the 10 m size (120 px). They are on the 10 m grid already and must not be
  upsampled a second time. When each 2 x 2 block of every such band is one value (the band is the
  nearest-neighbour upsampling of a 60 px band), taking every other pixel gives that 60 px band
  back exactly, and the patch ships as the release has it: the model sees exactly what it sees for
  the original, whatever its upsampling (nearest or CSMAE's bicubic). Otherwise decimating would
  lose information (it is not lossless in general), so the bands ship at 120 px with the 10 m ones
  (`RawPixels.fine`, as a multi-band query GeoTIFF's do): the model picks channels by name and
  upsamples nothing for them (its upsampling is for `coarse` only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality, band_groups, bands_for, native_size
from rsretrieve.datasets.base import PATCH
from rsretrieve.datasets.limits import check_range, check_size
from rsretrieve.errors import DataError, located
from rsretrieve.io.lmdb import get as lmdb_get
from rsretrieve.pixels import RawPixels

S1_INTEGER = "S1 integer dB converted to float32"
DECIMATED = "20 m bands at 120 px taken back to 60 px (exact: nearest-upsampled copies)"
AT_10M = "20 m bands at 120 px kept on the 10 m grid (not upsampled again)"


def _check_values(arr: np.ndarray, where: object, modality: Modality) -> np.ndarray:
    """The band's values checked; S1 integers (8/16 bit) returned as float32, values unchanged."""
    if modality == "s1":
        if arr.dtype.kind in "iu" and np.can_cast(arr.dtype, np.float32, "safe"):
            return arr.astype(np.float32)
        if arr.dtype.kind != "f":
            raise DataError(located(where, f"S1 band has dtype {arr.dtype}, expected float32 dB (or 8/16-bit integer dB)"))
    elif arr.dtype.kind not in "uif":
        raise DataError(located(where, f"S2 band has dtype {arr.dtype}, expected uint16"))
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(located(where, f"{bad} NaN/infinite pixel(s)"))
    if modality == "s1":
        check_range(where, arr, "s1")
    if modality == "s2" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(located(where, f"S2 values {arr.min()}..{arr.max()} outside the uint16 range of digital numbers"))
    return arr


def _blocks_of_two(arr: np.ndarray) -> bool:
    """Whether each 2 x 2 block holds one value: the array is the nearest upsampling of arr[::2, ::2]."""
    half = arr[::2, ::2]
    return all(np.array_equal(arr[i::2, j::2], half) for i in (0, 1) for j in (0, 1))


def assemble(bands: dict[str, np.ndarray], modality: Modality, where: object,
             band_where: Callable[[str], object] | None = None,
             converted: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Band dict (native sizes) -> raw (10 m bands (C, 120, 120), 20 m bands (C', 60, 60) or None),
    in `bands.band_groups(modality)` order: S2 as uint16 digital numbers, S1 as float32 dB. Each
    band's values are checked; a bad one is named `band_where(band)` (default "<where> <band>").
    20 m bands delivered at 120 px that are not nearest-upsampled copies come back with the 10 m
    bands, (C + C', 120, 120), and None (see the module docstring); each conversion made is
    appended to `converted`."""
    dtype = np.float32 if modality == "s1" else np.uint16
    fine_names, coarse_names = band_groups(modality)
    arrays, notes = {}, []
    for band in fine_names + coarse_names:
        if band not in bands:
            raise DataError(located(where, f"band {band} missing"))
        arr = np.asarray(bands[band])
        size = native_size(band)
        if arr.shape != (size, size) and not (band in coarse_names and arr.shape == (PATCH, PATCH)):
            expected = f"({size}, {size})" + (f" or ({PATCH}, {PATCH})" if band in coarse_names else "")
            raise DataError(located(where, f"band {band} is {arr.shape}, expected {expected}"))
        checked = _check_values(arr, band_where(band) if band_where else f"{where} {band}", modality)
        if checked is not arr and S1_INTEGER not in notes:
            notes.append(S1_INTEGER)
        arrays[band] = checked
    full_size = [b for b in coarse_names if arrays[b].shape == (PATCH, PATCH)]
    on_10m_grid = False
    if full_size and all(_blocks_of_two(arrays[b]) for b in full_size):
        arrays.update({b: arrays[b][::2, ::2] for b in full_size})
        notes.append(DECIMATED)
    elif full_size and len(full_size) < len(coarse_names):
        rest = [b for b in coarse_names if b not in full_size]
        raise DataError(located(where, f"20 m bands at mixed sizes: {' '.join(full_size)} at {PATCH} px, {' '.join(rest)} at {PATCH // 2} px"))
    elif full_size:
        on_10m_grid = True
        notes.append(AT_10M)
    if converted is not None:
        converted.extend(notes)
    fine = np.stack([arrays[b] for b in fine_names]).astype(dtype, copy=False)
    if not coarse_names:
        return fine, None
    coarse = np.stack([arrays[b] for b in coarse_names]).astype(dtype, copy=False)
    if on_10m_grid:
        return np.concatenate([fine, coarse]), None
    return fine, coarse


def at_10m(patch: tuple[np.ndarray, np.ndarray | None], modality: Modality) -> bool:
    """Whether `assemble` returned this patch's 20 m bands on the 10 m grid, with the 10 m bands."""
    return patch[1] is None and bool(band_groups(modality)[1])


def stack_raw(patches: list[tuple[np.ndarray, np.ndarray | None]], modality: Modality) -> RawPixels:
    """Raw pixels of several patches, each (10 m bands, 20 m bands) as `assemble` returns them; all
    with the 20 m bands at 60 px, or all with them on the 10 m grid (ValueError otherwise)."""
    fine_names, coarse_names = band_groups(modality)
    full = [at_10m(p, modality) for p in patches]
    if any(full) and not all(full):
        raise ValueError("patches with 20 m bands at 60 px and on the 10 m grid do not stack into one batch")
    if coarse_names and all(full):
        return RawPixels(np.stack([f for f, _ in patches]), fine_names + coarse_names)
    coarse = np.stack([c for _, c in patches]) if coarse_names else None
    return RawPixels(np.stack([f for f, _ in patches]), fine_names, coarse, coarse_names)


def read_band_tif(path: Path):
    """(array, transform, crs) of a single-band GeoTIFF; DataError on anything unreadable."""
    import rasterio
    from rasterio.errors import RasterioError

    if not path.is_file():
        raise DataError(located(path, "missing band file"))
    try:
        with rasterio.open(path) as ds:
            if ds.count != 1:
                raise DataError(located(path, f"has {ds.count} bands, expected 1"))
            check_size(path, ds.height, ds.width, 1, ds.dtypes[0])
            return ds.read(1), ds.transform, ds.crs
    except DataError:
        raise
    except (RasterioError, OSError, ValueError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(located(path, f"unreadable GeoTIFF ({msg})")) from None


def read_band_pixels(path: Path) -> np.ndarray:
    """The pixels of a single-band GeoTIFF, decoded with tifffile: a BigEarthNet band file is 7-29 KB,
    and GDAL's open costs more than its decoding (2.5x the whole read). Anything tifffile does not
    read as one plain band (or at all), and floating-point predictors (S1 dB, which tifffile undoes
    slower than GDAL), go through `read_band_tif`, which reads it or says why not."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if len(tif.pages) == 1 and page.samplesperpixel == 1 and page.predictor != 3:
                check_size(path, page.imagelength, page.imagewidth, 1, page.dtype)
                return page.asarray()
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - missing, truncated, another codec: GDAL's turn, with its message
        pass
    return read_band_tif(path)[0]


def read_patch_folder(folder: Path, modality: Modality, name: str | None = None, converted: list[str] | None = None):
    """Raw (10 m bands, 20 m bands) as `assemble` returns them and the (transform, crs) of its first georeferenced 10 m band
    (else the first 10 m band's transform and crs None), from a patch folder holding the
    single-band GeoTIFFs `<name>_<band>.tif` (`name` defaults to the folder's name)."""
    folder = Path(folder)
    name = name or folder.name
    bands, geo = {}, None
    for band in bands_for(modality):
        path = folder / f"{name}_{band}.tif"
        if geo is None or (geo[1] is None and native_size(band) == PATCH):
            # GDAL for the georeference: the first 10 m band (bands_for starts with one), or the
            # next when the first has no CRS
            arr, transform, crs = read_band_tif(path)
            if native_size(band) == PATCH and (geo is None or crs is not None):
                geo = (transform, crs)
        else:
            arr = read_band_pixels(path)
        bands[band] = arr
    transform, crs = geo if geo is not None else (None, None)
    return assemble(bands, modality, folder, lambda band: folder / f"{name}_{band}.tif", converted), transform, crs


def read_lmdb_patch(path: Path, name: str, modality: Modality, txn=None,
                    converted: list[str] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw (10 m bands, 20 m bands) of one patch from a rico-hdl LMDB, in the given read
    transaction or one of its own (the environment is the process's, `io.lmdb`)."""
    from safetensors.numpy import load

    where = f"{path}[{name}]"
    value = lmdb_get(path, name) if txn is None else txn.get(name.encode())
    if value is None:
        raise DataError(located(path, f"no entry for {name}"))
    try:
        bands = load(bytes(value))
    except Exception as e:  # safetensors raises its own error types
        raise DataError(located(where, f"corrupt safetensors value ({' '.join(str(e).split())})")) from None
    return assemble(bands, modality, where, converted=converted)
