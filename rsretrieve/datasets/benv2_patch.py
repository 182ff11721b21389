"""One BigEarthNet-v2 patch's bands, read and checked: from its GeoTIFF folder or an LMDB value.

Raw values (`preprocess.RawPixels`): S2 digital numbers as uint16, the 10 m bands at 120 px and the
20 m bands at their native 60 px; S1 backscatter in dB as float32. Anything else (a missing band,
a wrong shape or dtype, NaN) is a one-line `DataError` naming the file.
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
from rsretrieve.preprocess import RawPixels


def _check_values(arr: np.ndarray, where: object, modality: Modality) -> None:
    if modality == "s1":
        if arr.dtype.kind != "f":
            raise DataError(located(where, f"S1 band has dtype {arr.dtype}, expected float32 dB"))
    elif arr.dtype.kind not in "uif":
        raise DataError(located(where, f"S2 band has dtype {arr.dtype}, expected uint16"))
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(located(where, f"{bad} NaN/infinite pixel(s)"))
    if modality == "s1":
        check_range(where, arr, "s1")
    if modality == "s2" and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DataError(located(where, f"S2 values {arr.min()}..{arr.max()} outside the uint16 range of digital numbers"))


def assemble(bands: dict[str, np.ndarray], modality: Modality, where: object,
             band_where: Callable[[str], object] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Band dict (native sizes) -> raw (10 m bands (C, 120, 120), 20 m bands (C', 60, 60) or None),
    in `bands.band_groups(modality)` order: S2 as uint16 digital numbers, S1 as float32 dB. Each
    band's values are checked; a bad one is named `band_where(band)` (default "<where> <band>")."""
    dtype = np.float32 if modality == "s1" else np.uint16
    groups = []
    for names in band_groups(modality):
        if not names:
            groups.append(None)
            continue
        size = native_size(names[0])
        out = np.empty((len(names), size, size), dtype)
        for i, band in enumerate(names):
            if band not in bands:
                raise DataError(located(where, f"band {band} missing"))
            arr = np.asarray(bands[band])
            if arr.shape != (size, size):
                raise DataError(located(where, f"band {band} is {arr.shape}, expected ({size}, {size})"))
            _check_values(arr, band_where(band) if band_where else f"{where} {band}", modality)
            out[i] = arr
        groups.append(out)
    return groups[0], groups[1]


def stack_raw(patches: list[tuple[np.ndarray, np.ndarray | None]], modality: Modality) -> RawPixels:
    """Raw pixels of several patches, each (10 m bands, 20 m bands) as `assemble` returns them."""
    fine_names, coarse_names = band_groups(modality)
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


def read_patch_folder(folder: Path, modality: Modality, name: str | None = None):
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
    return assemble(bands, modality, folder, lambda band: folder / f"{name}_{band}.tif"), transform, crs


def read_lmdb_patch(path: Path, name: str, modality: Modality, txn=None) -> tuple[np.ndarray, np.ndarray | None]:
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
    return assemble(bands, modality, where)
