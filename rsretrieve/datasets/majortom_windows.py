"""The patches a Major TOM plan yields: one row per window of every planned tile, with the columns
the shard-reading path gives, as one table (`plan_metadata`) or a slice at a time
(`PlannedWindows`, what a store of 10^8 patches is created from).

Every window's lat/lon: the tile centre projected into the tile's `crs` (pyproj), moved by the
window's offset at 10 m per pixel, projected back.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rsretrieve.datasets.base import META_TYPES, PATCH
from rsretrieve.datasets.majortom_plan import PIXEL_M, TilePlan, dictionary_codes, window_sets
from rsretrieve.errors import DataError, located
from rsretrieve.io.remote import one_line


def plan_metadata(plan: TilePlan, size: int = PATCH, rule: str = "majortom", locations: bool = True) -> pa.Table:
    """One row per planned window, in chunk order, with the columns (and types) the shard-reading
    path gives; lat/lon null when `locations` is False."""
    tiles = {name: plan.tiles[name].combine_chunks() for name in plan.tiles.column_names}
    counts, first, all_windows = window_sets(tiles["tile_px"].to_numpy(), size, rule)
    tile = np.repeat(np.arange(len(counts)), counts)
    wins = all_windows[first[tile] + np.arange(len(tile)) - np.repeat(np.cumsum(counts) - counts, counts)]
    per_window = {name: tiles[name].take(pa.array(tile)) for name in ("key", "product_id", "grid_cell", "timestamp", "source_patch_id")
                  if name in tiles}
    row, col = (pa.array(wins[:, i]).cast(pa.string()) for i in (0, 1))
    pair = pc.binary_join_element_wise(per_window["key"], pc.binary_join_element_wise(row, col, "_"), "/")
    lat, lon = _window_latlon(tiles, tile, wins, plan.source) if locations else (pa.nulls(len(tile), pa.float64()),) * 2
    offsets = pa.array(np.arange(0, 4 * len(tile) + 1, 4, dtype=np.int32))
    columns = {"patch_id": pc.binary_join_element_wise(per_window["product_id"], pair, "/"), "pair_id": pair, "lat": lat, "lon": lon,
               "grid_cell": per_window["grid_cell"], "timestamp": per_window["timestamp"], "product_id": per_window["product_id"],
               "window": pa.ListArray.from_arrays(offsets, pa.array(wins.ravel()))}
    if "source_patch_id" in per_window:
        columns["source_patch_id"] = per_window["source_patch_id"]
    return pa.table({name: values.cast(META_TYPES[name]) for name, values in columns.items()})


class PlannedWindows:
    """`plan_metadata`'s table, made a slice at a time: what a store of 10^8 patches is created from
    (Major TOM Core's 144 M S2 windows would be ~10 GB as one table; a slice of a million rows is
    ~0.1 GB). Holds only the window count of each tile.

        rows = PlannedWindows(plan)
        rows.num_rows                      # every window of every planned tile
        rows.slice(2_000_000, 1_000_000)   # == plan_metadata(plan).slice(2_000_000, 1_000_000)
    """

    def __init__(self, plan: TilePlan, size: int = PATCH, rule: str = "majortom", locations: bool = False):
        self.plan, self.size, self.rule, self.locations = plan, size, rule, locations
        counts, _, _ = window_sets(plan.tiles["tile_px"].to_numpy(), size, rule)
        self._ends = np.cumsum(counts)  # rows before the end of each tile
        self.num_rows = int(self._ends[-1]) if len(self._ends) else 0

    def slice(self, offset: int = 0, length: int | None = None) -> pa.Table:
        stop = self.num_rows if length is None else min(self.num_rows, offset + length)
        if stop <= offset:  # no rows, with the columns and types
            return self.slice(0, 1).slice(0, 0) if self.num_rows else plan_metadata(self.plan, self.size, self.rule, self.locations)
        first = int(np.searchsorted(self._ends, offset, side="right"))  # the tile holding row `offset`
        last = int(np.searchsorted(self._ends, stop - 1, side="right"))
        before = int(self._ends[first - 1]) if first else 0
        part = replace(self.plan, tiles=self.plan.tiles.slice(first, last + 1 - first))
        return plan_metadata(part, self.size, self.rule, self.locations).slice(offset - before, stop - offset)


def _projection(src: str, dst: str):
    """A vectorised (xs, ys) -> (xs, ys) projection: pyproj's, else GDAL's (pyproj comes with
    geopandas, not with rsretrieve's own dependencies)."""
    try:
        from pyproj import Transformer
    except ImportError:
        from rasterio.warp import transform

        return lambda xs, ys: tuple(np.asarray(v, np.float64) for v in transform(src, dst, xs, ys))
    return Transformer.from_crs(src, dst, always_xy=True).transform


def _window_latlon(tiles: dict[str, pa.Array], tile: np.ndarray, wins: np.ndarray, source) -> tuple[pa.Array, pa.Array]:
    """lat, lon of each window centre: the tile centre into the tile's CRS, moved by the window's
    offset from the tile centre at 10 m per pixel (rows run south), and back; one projection per CRS."""
    lat = np.full(len(tile), np.nan)
    lon = np.full(len(tile), np.nan)
    crs_codes, crs_names = dictionary_codes(pa.chunked_array([pc.fill_null(tiles["crs"], "")]))
    centre_lat = tiles["centre_lat"].to_numpy(False).astype(np.float64)
    centre_lon = tiles["centre_lon"].to_numpy(False).astype(np.float64)
    half = tiles["tile_px"].to_numpy().astype(np.float64)[tile] / 2.0
    dx = (wins[:, 1] + wins[:, 3] / 2.0 - half) * PIXEL_M
    dy = -(wins[:, 0] + wins[:, 2] / 2.0 - half) * PIXEL_M
    for code, name in enumerate(crs_names):
        if not name:
            continue  # no CRS: no location, as a GeoTIFF without one
        try:
            forward, back = _projection("EPSG:4326", name), _projection(name, "EPSG:4326")
        except Exception as e:  # noqa: BLE001 - pyproj's and GDAL's errors differ; either way the CRS is unknown
            raise DataError(located(source, f"crs {name!r} is not a coordinate reference system ({one_line(e)})")) from None
        of_crs = crs_codes == code
        x, y = forward(centre_lon[of_crs], centre_lat[of_crs])
        cx, cy = np.full(len(of_crs), np.nan), np.full(len(of_crs), np.nan)
        cx[of_crs], cy[of_crs] = x, y
        sel = of_crs[tile]
        lon[sel], lat[sel] = back(cx[tile[sel]] + dx[sel], cy[tile[sel]] + dy[sel])
    unknown = ~(np.isfinite(lat) & np.isfinite(lon))  # no centre, or one the CRS cannot hold
    lat[unknown] = lon[unknown] = np.nan
    return pa.array(lat, from_pandas=True), pa.array(lon, from_pandas=True)
