"""Geometry helpers: the Major TOM grid, MGRS 100 km squares, UTM <-> WGS84.

Major TOM grid (REFERENCE.md section 4, 10 km spacing):
- rows: ``r = floor(lat / (180 / 2004))``, named ``"{r}U"`` for r >= 0 and ``"{|r|}D"`` for r < 0;
- columns of row r: ``n = ceil(2*pi*6378.137*cos(row_lat) / 10)`` with ``row_lat`` the latitude of
  the row's bottom edge (``r * 180/2004``), ``c = floor(lon / (360 / n))``, named ``"{c}R"`` for
  c >= 0 and ``"{|c|}L"`` for c < 0;
- the cell name is ``"{row}_{col}"`` (the cell is named from its bottom-left corner).
Example: Naples (40.85 N, 14.27 E) -> ``"454U_120R"``.
"""

from __future__ import annotations

import math
import re

import numpy as np

EARTH_RADIUS_KM = 6378.137
GRID_KM = 10.0
N_ROWS = 2004  # ceil(pi * R / 10 km), rows from pole to pole
ROW_DEG = 180.0 / N_ROWS


def grid_row(lat: float) -> int:
    return math.floor(lat / ROW_DEG)


def grid_n_cols(row: int) -> int:
    row_lat = row * ROW_DEG
    return math.ceil(2 * math.pi * EARTH_RADIUS_KM * math.cos(math.radians(row_lat)) / GRID_KM)


def grid_col(lat: float, lon: float) -> int:
    return math.floor(lon / (360.0 / grid_n_cols(grid_row(lat))))


def row_name(row: int) -> str:
    return f"{row}U" if row >= 0 else f"{-row}D"


def col_name(col: int) -> str:
    return f"{col}R" if col >= 0 else f"{-col}L"


def grid_cell(lat: float, lon: float) -> str:
    """Major TOM grid cell name for a point, e.g. ``grid_cell(40.85, 14.27) == "454U_120R"``."""
    row = grid_row(lat)
    return f"{row_name(row)}_{col_name(grid_col(lat, lon))}"


def grid_indices(lat: float, lon: float) -> tuple[int, int]:
    """(grid_row_u, grid_col_r): the signed row and column indices of the cell."""
    return grid_row(lat), grid_col(lat, lon)


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
    """(lat, lon) of the bottom-left corner of a named cell."""
    row, col = parse_grid_cell(name)
    return row * ROW_DEG, col * 360.0 / grid_n_cols(row)


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
