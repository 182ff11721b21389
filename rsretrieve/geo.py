"""Geometry helpers: the Major TOM grid, MGRS 100 km squares, UTM <-> WGS84.

Major TOM grid (ESA Phi-lab's `MajorTOM/grid.py` `Grid(10)`, REFERENCE.md section 4), computed
the way that code computes it, so names agree bit for bit (a golden test holds 10,000 points
named by Major TOM's own code, `tools/golden/make_majortom_golden.py`):

- rows: n = ceil(pi * 6378.137 / 10) = 2004 latitudes `linspace(-90, 90, n + 1)[:-1]`, shifted by
  `mod(., 180) - 90` and sorted; the row at 0 is "0U", rows above "1U", "2U", ..., below "1D",
  "2D", ...; only rows with -85 <= lat <= 85 exist (946D ... 946U, lat -84.97 ... 84.97);
- columns of a row at latitude L (its bottom edge): m = ceil(2 pi (R cos(L pi / 180)) / 10)
  longitudes `mod(linspace(-180, 180, m + 1)[:-1], 360) - 180`, sorted; the one at 0 is "0R",
  east of it "1R", ..., west "1L", ...;
- a point belongs to the last row whose latitude is below it (a point on a line: the row
  below) and, in it, the last column whose longitude is below it; west of the row's first
  column it wraps to the row's last column (the antimeridian);
- the cell name is ``"{row}_{col}"`` (the cell is named from its bottom-left corner), e.g. Naples
  (40.85 N, 14.27 E) -> ``"454U_120R"``.

Points south of the lowest row (-84.97) or north of the top row's top edge (85.06) lie outside
the grid: `grid_cell` raises (Major TOM's code wraps such a southern point to the top row "946U",
an artefact of its index arithmetic that names no real cell).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np

EARTH_RADIUS_KM = 6378.137
GRID_KM = 10.0
LAT_RANGE = (-85.0, 85.0)


def _grid_lines(start: float, stop: float, n: int, period: float, half: float) -> np.ndarray:
    """Major TOM's n grid lines over [start, stop): linspace, shifted by mod(., period) - half, sorted."""
    return np.sort(np.mod(np.linspace(start, stop, n + 1)[:-1], period) - half)


@lru_cache(maxsize=None)
def _rows() -> tuple[np.ndarray, np.ndarray]:
    """(row latitudes, signed row indices) of the rows the grid keeps, south to north."""
    lats = _grid_lines(-90, 90, math.ceil(math.pi * EARTH_RADIUS_KM / GRID_KM), 180, 90)
    signed = np.arange(lats.size) - int(np.searchsorted(lats, 0))
    keep = (lats >= LAT_RANGE[0]) & (lats <= LAT_RANGE[1])
    return lats[keep], signed[keep]


ROW_DEG = 180.0 / math.ceil(math.pi * EARTH_RADIUS_KM / GRID_KM)  # row spacing, about 0.0898 degrees


@lru_cache(maxsize=4096)
def _columns(row_lat: float) -> tuple[np.ndarray, int]:
    """(column longitudes, index of the 0 R column) of the row at `row_lat`."""
    circumference = 2 * math.pi * (EARTH_RADIUS_KM * math.cos(row_lat * math.pi / 180))
    lons = _grid_lines(-180, 180, math.ceil(circumference / GRID_KM), 360, 180)
    return lons, int(np.flatnonzero(lons == 0)[0])


def grid_indices(lat: float, lon: float) -> tuple[int, int]:
    """(grid_row_u, grid_col_r): the signed row and column of the cell holding a point (Major TOM's
    `latlon2rowcol(..., integer=True)`)."""
    lats, signed = _rows()
    top = lats[-1] + (lats[-1] - lats[-2])
    if not lats[0] < lat <= top:  # on the lowest line the point belongs to the row below it
        raise ValueError(f"latitude {lat} is outside Major TOM's grid ({lats[0]:.4f} < lat <= {top:.4f})")
    r = int(np.searchsorted(lats, lat)) - 1
    lons, zero = _columns(float(lats[r]))
    c = (int(np.searchsorted(lons, lon)) - 1) % lons.size  # west of the first column: the last one
    return int(signed[r]), c - zero


def row_name(row: int) -> str:
    return f"{row}U" if row >= 0 else f"{-row}D"


def col_name(col: int) -> str:
    return f"{col}R" if col >= 0 else f"{-col}L"


def grid_cell(lat: float, lon: float) -> str:
    """Major TOM grid cell name for a point, e.g. ``grid_cell(40.85, 14.27) == "454U_120R"``."""
    row, col = grid_indices(lat, lon)
    return f"{row_name(row)}_{col_name(col)}"


_CELL = re.compile(r"^(\d+)([UD])_(\d+)([RL])$")


def parse_grid_cell(name: str) -> tuple[int, int]:
    """``"454U_120R"`` -> (454, 120); ``"3D_5L"`` -> (-3, -5)."""
    m = _CELL.match(name)
    if not m:
        raise ValueError(f"not a Major TOM grid cell name: {name!r}")
    row = int(m.group(1)) * (1 if m.group(2) == "U" else -1)
    col = int(m.group(3)) * (1 if m.group(4) == "R" else -1)
    return row, col


def grid_cell_bottom_left(name: str) -> tuple[float, float]:
    """(lat, lon) of the bottom-left corner (the grid point) of a named cell."""
    row, col = parse_grid_cell(name)
    lats, signed = _rows()
    hit = np.flatnonzero(signed == row)
    if not hit.size:
        raise ValueError(f"{name}: no such row in Major TOM's grid")
    lons, zero = _columns(float(lats[hit[0]]))
    if not 0 <= zero + col < lons.size:
        raise ValueError(f"{name}: no such column in row {row_name(row)}")
    return float(lats[hit[0]]), float(lons[zero + col])


# --- MGRS 100 km squares (for the approximate georeference of BigEarthNet tiles) -------------

_COL_SETS = ("ABCDEFGH", "JKLMNPQR", "STUVWXYZ")
_ROW_LETTERS = "ABCDEFGHJKLMNPQRSTUV"
_BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 degree latitude bands from 80 S


def mgrs_square_origin(tile: str) -> tuple[int, float, float]:
    """(utm_zone, easting, northing) of the south-west corner of an MGRS 100 km square such as
    ``"33UUP"`` (zone 33, band U, column U, row P). Northern hemisphere bands only."""
    m = re.fullmatch(r"(\d{1,2})([C-X])([A-Z])([A-Z])", tile.upper())
    if not m:
        raise ValueError(f"not an MGRS tile id: {tile!r}")
    zone, band, col_letter, row_letter = int(m.group(1)), m.group(2), m.group(3), m.group(4)
    if band < "N":
        raise ValueError(f"{tile}: southern-hemisphere MGRS tiles are not supported")
    col_set = _COL_SETS[(zone - 1) % 3]
    easting = (col_set.index(col_letter) + 1) * 100_000.0
    offset = 5 if zone % 2 == 0 else 0
    row_mod = (_ROW_LETTERS.index(row_letter) - offset) % 20  # northing / 100 km, modulo 2000 km
    # latitude band's southern edge -> approximate northing, then pick the 2000 km cycle that fits
    band_south = -80 + 8 * _BANDS.index(band)
    approx_n = band_south * 110_946.0  # metres per degree of latitude (close enough to choose a cycle)
    cycle = round((approx_n - row_mod * 100_000.0) / 2_000_000.0)
    northing = row_mod * 100_000.0 + cycle * 2_000_000.0
    while northing + 100_000 < approx_n:
        northing += 2_000_000.0
    return zone, easting, northing


def utm_epsg(zone: int, north: bool = True) -> int:
    return (32600 if north else 32700) + zone


def to_wgs84(crs, xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Project points from `crs` (anything rasterio accepts) to (lat, lon) arrays in WGS84."""
    from rasterio.warp import transform

    lons, lats = transform(crs, "EPSG:4326", list(np.atleast_1d(xs)), list(np.atleast_1d(ys)))
    return np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64)


def pixel_to_xy(transform, col: float, row: float) -> tuple[float, float]:
    """Map coordinates of a (fractional) pixel position through an affine geotransform."""
    return (transform.a * col + transform.b * row + transform.c, transform.d * col + transform.e * row + transform.f)


def centres_to_wgs84(centres: list) -> tuple[list, list]:
    """Batch-project (x, y, crs) centres (or None) to WGS84 lat, lon lists."""
    lat: list = [None] * len(centres)
    lon: list = [None] * len(centres)
    by_crs: dict[str, list[int]] = {}
    for i, c in enumerate(centres):
        if c is not None:
            by_crs.setdefault(c[2], []).append(i)
    for crs, idx in by_crs.items():
        la, lo = to_wgs84(crs, [centres[i][0] for i in idx], [centres[i][1] for i in idx])
        for j, i in enumerate(idx):
            lat[i], lon[i] = float(la[j]), float(lo[j])
    return lat, lon
