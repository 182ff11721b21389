"""Geometry helpers: the Major TOM grid, MGRS 100 km squares, UTM <-> WGS84, patch footprints.

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
from dataclasses import dataclass
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


# --- patch footprints: UTM zones, MGRS tiles in patch names, squares in WGS84 ----------------

PATCH_SIZE_M = 1200.0  # 120 px at 10 m: a BigEarthNet patch, a Major TOM window of the CSMoE input
_MGRS_TILE = r"\d{2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V]"  # zone, latitude band, 100 km square (no I, O)
_TILE_PATTERNS = (
    re.compile(rf"(?:^|[_/])T({_MGRS_TILE})(?=$|[_/.])"),  # S2 product / patch: ..._R022_T33UUP_26_57, ..._T33UUP/cell/r_c
    re.compile(rf"_({_MGRS_TILE})_\d+_\d+$"),  # BigEarthNet S1 patch: S1B_IW_GRDH_1SDV_20170612T165809_33UUP_37_88
)


def mgrs_tile_of(patch_id: str) -> str | None:
    """The Sentinel-2 MGRS tile named in a patch or product id, or None.

    ``S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57`` (BigEarthNet S2), ``S1B_IW_GRDH_1SDV_
    20170612T165809_33UUP_37_88`` (BigEarthNet S1) and Major TOM ids that contain their product
    (``S2B_MSIL2A_..._T33UUP_.../539U_97R/0_0``) give ``"33UUP"``; Major TOM S1 ids hold no tile."""
    for pattern in _TILE_PATTERNS:
        m = pattern.search(str(patch_id))
        if m:
            return m.group(1)
    return None


def _standard_utm_zone(lat: float, lon: float) -> int:
    """The UTM zone of a point: 6 degree zones from 180 W, with the Norway (32V) and Svalbard
    (31X, 33X, 35X, 37X) exceptions."""
    lon = (float(lon) + 180.0) % 360.0 - 180.0
    zone = min(int((lon + 180.0) // 6.0) + 1, 60)
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        return 32
    if 72.0 <= lat < 84.0 and 0.0 <= lon < 42.0:
        return 31 if lon < 9.0 else 33 if lon < 21.0 else 35 if lon < 33.0 else 37
    return zone


def utm_epsg_of(lat: float, lon: float, mgrs_tile: str | None = None) -> int:
    """The EPSG code of a patch's UTM CRS: the zone of its MGRS tile when known (``"33UUP"`` ->
    32633; bands C-M are south, 327xx, N-X north, 326xx), else the standard zone of `lon` (Norway
    and Svalbard exceptions included) in the hemisphere of `lat`.

    The tile wins over the longitude: a tile's raster stays in its own zone where it reaches into
    the next one (32TQM, zone 32, lies about 11.6-13.0 E, largely in zone 33's longitudes)."""
    if mgrs_tile:
        m = re.fullmatch(rf"({_MGRS_TILE})", str(mgrs_tile).upper())
        zone = int(m.group(1)[:2]) if m else 0
        if not 1 <= zone <= 60:
            raise ValueError(f"not an MGRS tile id: {mgrs_tile!r}")
        return utm_epsg(zone, north=m.group(1)[2] >= "N")
    if not (math.isfinite(lat) and math.isfinite(lon)):
        raise ValueError(f"no UTM zone for a point at lat {lat}, lon {lon}")
    return utm_epsg(_standard_utm_zone(lat, lon), north=lat >= 0)


def _squares(xs: np.ndarray, ys: np.ndarray, size_m: float) -> np.ndarray:
    """Squares of side `size_m` centred on (xs, ys), counterclockwise."""
    import shapely

    half = size_m / 2.0
    return shapely.box(xs - half, ys - half, xs + half, ys + half)


def _to_wgs84_geoms(epsg: int, squares, densify_m: float | None) -> np.ndarray:
    """Squares in a UTM CRS -> shapely geometries in WGS84 (lon, lat), with rasterio.warp.transform_geom
    (one call for all of them); edges densified first so that they follow the projection."""
    import shapely
    from rasterio.warp import transform_geom

    squares = np.asarray(squares, dtype=object)
    if densify_m:
        squares = shapely.segmentize(squares, densify_m)
    coords = shapely.get_coordinates(squares).tolist()
    ends = np.cumsum(shapely.get_num_coordinates(squares)).tolist()
    rings = [coords[a:b] for a, b in zip([0, *ends[:-1]], ends)]
    mapped = transform_geom(f"EPSG:{epsg}", "EPSG:4326", [{"type": "Polygon", "coordinates": [r]} for r in rings])
    out = np.empty(len(mapped), dtype=object)
    simple = [i for i, g in enumerate(mapped) if g["type"] == "Polygon" and len(g["coordinates"]) == 1]
    if simple:  # the usual case, built at once; a square cut at the antimeridian comes back a MultiPolygon
        back = [np.asarray(mapped[i]["coordinates"][0], dtype=np.float64) for i in simple]
        index = np.repeat(np.arange(len(back)), [len(b) for b in back])
        out[simple] = shapely.polygons(shapely.linearrings(np.concatenate(back), indices=index))
    for i in set(range(len(mapped))) - set(simple):
        out[i] = shapely.geometry.shape(mapped[i])
    return shapely.orient_polygons(out)


def footprint(lat: float, lon: float, epsg: int, size_m: float = PATCH_SIZE_M, densify_m: float | None = 300.0):
    """The square of side `size_m` centred on (lat, lon) in the UTM CRS `epsg`, as a shapely Polygon in
    WGS84 (lon, lat order; counterclockwise; a MultiPolygon if it crosses the antimeridian). The
    centre goes into UTM with `rasterio.warp.transform`, the square back with `transform_geom`, its
    edges cut into segments of at most `densify_m` metres (None: the 4 corners only)."""
    from rasterio.warp import transform

    xs, ys = transform("EPSG:4326", f"EPSG:{int(epsg)}", [float(lon)], [float(lat)])
    return _to_wgs84_geoms(int(epsg), _squares(np.asarray(xs), np.asarray(ys), size_m), densify_m)[0]


@dataclass(frozen=True)
class Footprints:
    """Footprints of many patches, aligned with the input; None / 0 where a patch has no location."""

    wgs84: np.ndarray  # object: shapely Polygon (lon, lat) in WGS84, or None
    utm: np.ndarray  # object: shapely Polygon (the 4 corners) in the patch's UTM CRS, or None
    epsg: np.ndarray  # int32: that CRS's EPSG code, 0 where unknown


def patch_footprints(lats, lons, patch_ids=None, size_m: float = PATCH_SIZE_M, densify_m: float | None = 300.0) -> Footprints:
    """`footprint` for many patches: the UTM zone of each from the MGRS tile in its id (`mgrs_tile_of`)
    or its position (`utm_epsg_of`), then one `transform` and one `transform_geom` call per zone."""
    from rasterio.warp import transform

    lats = np.asarray(lats, dtype=np.float64).ravel()
    lons = np.asarray(lons, dtype=np.float64).ravel()
    n = lats.size
    ids = [None] * n if patch_ids is None else [str(p) for p in patch_ids]
    if lons.size != n or len(ids) != n:
        raise ValueError(f"lats, lons and patch_ids differ in length ({n}, {lons.size}, {len(ids)})")
    located = np.isfinite(lats) & np.isfinite(lons)
    epsg = np.zeros(n, dtype=np.int32)
    for i in np.flatnonzero(located):
        epsg[i] = utm_epsg_of(lats[i], lons[i], mgrs_tile_of(ids[i]) if ids[i] else None)
    wgs84 = np.full(n, None, dtype=object)
    utm = np.full(n, None, dtype=object)
    for code in np.unique(epsg[located]):
        rows = np.flatnonzero(epsg == code)
        xs, ys = transform("EPSG:4326", f"EPSG:{int(code)}", lons[rows].tolist(), lats[rows].tolist())
        squares = _squares(np.asarray(xs), np.asarray(ys), size_m)
        utm[rows] = squares
        wgs84[rows] = _to_wgs84_geoms(int(code), squares, densify_m)
    return Footprints(wgs84, utm, epsg)


def footprints(lats, lons, patch_ids=None, size_m: float = PATCH_SIZE_M, densify_m: float | None = 300.0) -> np.ndarray:
    """WGS84 footprints (shapely Polygons, None where a patch has no location) of many patches."""
    return patch_footprints(lats, lons, patch_ids, size_m, densify_m).wgs84
