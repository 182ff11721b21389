"""What a raster may declare before a byte of its pixels is allocated, and the physical range of
its values: untrusted headers (a 461 KB GeoTIFF can declare 200,000 x 200,000 px) and values (1e30
"reflectance") are refused in one line naming the file.

- Size: a query tile's, a band file's or a band cell's declared width x height is at most
  `max_pixels()` (default 2**28 = 268,435,456 px, twice a full 10,980 px Sentinel-2 tile; raised
  with `rsretrieve query --max-tile-pixels N` or $RSRETRIEVE_MAX_TILE_PIXELS), and each side at most
  4 x its square root (65,536 px by default): strips are read a full row wide, so the width bounds
  the memory of one strip, the area the work of the whole tile.
- Values (`check_range`): finite values only; S2 digital numbers (or reflectance) within
  -1,000 .. 100,000 (uint16 DN reach 65,535; L2A's offset makes small negatives), S1 backscatter in
  dB within -100 .. +100 (linear power: 0 .. 1e10, before the conversion to dB).
"""

from __future__ import annotations

import os

import numpy as np

from rsretrieve.errors import DataError, located

ENV = "RSRETRIEVE_MAX_TILE_PIXELS"
DEFAULT_MAX_PIXELS = 1 << 28
FLAG = "--max-tile-pixels"
RANGES = {"s2": (-1_000.0, 100_000.0), "s1": (-100.0, 100.0), "s1-linear": (0.0, 1e10)}


def max_pixels() -> int:
    """The cap on a raster's declared width x height: $RSRETRIEVE_MAX_TILE_PIXELS, else 2**28."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(located(ENV, f"{text!r} is not a whole number of pixels above 0"))
    return value


def check_size(where: object, height: int, width: int, bands: int = 1, dtype=None, cap: int | None = None) -> None:
    """A DataError naming `where`, its declared size and how to raise the cap, when width x height
    is above the cap or a side above 4 x its square root. From the header: nothing is allocated."""
    cap = max_pixels() if cap is None else cap
    side = max(int(4 * cap**0.5), 1)
    if height * width <= cap and max(height, width) <= side:
        return
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 1
    what = f"{bands} band{'s' if bands != 1 else ''}" + (f" {np.dtype(dtype).name}" if dtype is not None else "")
    size = f" = {_bytes(height * width * bands * itemsize)}" if dtype is not None else ""
    limit = f"{cap:,} px" if height * width > cap else f"{side:,} px a side"
    raise DataError(located(where, f"declares {width:,} x {height:,} px x {what}{size}; more than the limit of {limit} "
                                   f"(raise it with {FLAG} or ${ENV})"))


def _bytes(n: float) -> str:
    """'460.8 GB': decimal units, B up to TB."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def check_range(where: object, values: np.ndarray, kind: str) -> None:
    """A DataError naming `where` when a value is not finite or lies outside the physical range of
    `kind` ("s2" digital numbers or reflectance, "s1" dB, "s1-linear" power)."""
    if values.size == 0:
        return
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DataError(located(where, f"{int((~np.isfinite(values)).sum())} NaN/infinite value(s)"))
    lo, hi = RANGES[kind]
    vmin, vmax = values.min(), values.max()
    if vmin < lo or vmax > hi:
        unit = {"s2": "Sentinel-2 digital numbers", "s1": "Sentinel-1 dB", "s1-linear": "Sentinel-1 linear power"}[kind]
        raise DataError(located(where, f"values {vmin:g} .. {vmax:g} outside the physical range of {unit} ({lo:g} .. {hi:g})"))
