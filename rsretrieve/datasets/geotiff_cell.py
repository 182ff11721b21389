"""Band cells of Major TOM's image parquet: each a single-band GeoTIFF, decoded from its bytes."""

from __future__ import annotations

import numpy as np

from rsretrieve.datasets.limits import check_size
from rsretrieve.errors import DataError, located
from rsretrieve.io.remote import one_line as _one_line


def decode_pixels(data: bytes | None, where: str) -> tuple[np.ndarray, float | None]:
    """(array, nodata) of a GeoTIFF band cell, decoded with tifffile (its TIFF parsing costs a
    third of a GDAL open, which dominates small cells); GDAL (`decode_band`) when tifffile cannot."""
    import io

    import tifffile

    if not data:
        raise DataError(located(where, "empty band cell"))
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            if len(tif.pages) != 1 or page.samplesperpixel != 1 or page.predictor == 3:
                raise ValueError("not a plain single band (or a floating-point predictor, which GDAL undoes faster)")
            check_size(where, page.imagelength, page.imagewidth, 1, page.dtype)
            nodata = page.tags.get(42113)  # GDAL_NODATA, an ASCII number
            return page.asarray(), (float(nodata.value.strip("\x00 ")) if nodata is not None else None)
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - any codec or layout tifffile lacks: GDAL reads it, or says why not
        array, _, _, nodata = decode_band(data, where)
        return array, nodata


def decode_band(data: bytes | None, where: str, *, header_only: bool = False):
    """(array, transform, crs, nodata) of a GeoTIFF band cell, with GDAL. With `header_only`, the
    pixels are not decoded: ((height, width), transform, crs, nodata) from the GeoTIFF header alone."""
    from rasterio.io import MemoryFile

    if not data:
        raise DataError(located(where, "empty band cell"))
    try:
        with MemoryFile(data) as mf, mf.open() as ds:
            if not header_only:
                check_size(where, ds.height, ds.width, ds.count, ds.dtypes[0])
            first = (ds.height, ds.width) if header_only else ds.read(1)
            return first, ds.transform, ds.crs, ds.nodata
    except DataError:
        raise
    except Exception as e:
        raise DataError(located(where, f"undecodable GeoTIFF cell ({_one_line(e)})")) from None
