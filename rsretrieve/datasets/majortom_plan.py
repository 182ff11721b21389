"""Planning a Major TOM run from the collection's `metadata.parquet`: no image shard is opened.

Major TOM ships, beside each collection's shards, a `metadata.parquet` with one row per tile
(`grid_cell, product_id, timestamp, nodata, centre_lat, centre_lon, crs, parquet_url, parquet_row`,
...). Everything a run needs before it reads pixels comes from it, vectorised (pyarrow, numpy):

- which tiles: those in the shards found locally (`parquet_url` matched by file name), after the
  user's filters (`Filters`: grid cells, a lon/lat box on the tile centre, a date range, a maximum
  nodata fraction);
- their ids, equal to those the shard-reading path gives: tile key = grid_cell, or `grid_cell.k` for
  the k-th repeat of a cell in one shard (row order, over all its rows, filtered or not);
- their windows: each tile is taken to be Major TOM's nominal 1068 x 1068 px (S2 at 10 m and
  S1RTC alike), unless the metadata has a `tile_px` column or the user gives `tile_size`; a tile
  whose real size differs is reported at read time, never guessed before;
- chunks of `TILES_PER_CHUNK` tiles of one shard, in shard and row order.

The windows' own rows (ids, lat/lon) are `majortom_windows`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rsretrieve.datasets import majortom_remote as remote_shards
from rsretrieve.datasets.base import PATCH, Chunk
from rsretrieve.errors import DataError, RSRetrieveError, located
from rsretrieve.io import remote
from rsretrieve.io.remote import NotFound, is_url, one_line

TILES_PER_CHUNK = 8  # a few tiles (800 windows at 1068 px) per task: few tasks, each worth a worker's start-up
NOMINAL_TILE_PX = 1068  # Major TOM Core tiles: 10.68 km at 10 m, S2L2A and S1RTC alike
PIXEL_M = 10.0
METADATA_NAME = "metadata.parquet"
NEEDED_COLUMNS = ("grid_cell", "product_id", "timestamp", "centre_lat", "centre_lon", "crs", "parquet_url", "parquet_row")
SIZE_COLUMN = "tile_px"  # optional: a tile's side in pixels (the bundled sample's tiles are 120 px)
TIME_FORMATS = ("%Y%m%dT%H%M%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f",
                "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d")

WINDOW_RULES = ("majortom", "grid")
FRAGMENT_OVERLAP = 0.1  # Major TOM's embedder: target overlap, a tenth of the fragment


def fragment_offsets(length: int, size: int, overlap: float = FRAGMENT_OVERLAP) -> list[int]:
    """Window origins along one axis by Major TOM's fragmenter (`embedder/grid_cell_fragment.py`):
    n = round((L - F) / (F - overlap F)) segments, stride F - ceil(F - (L - F) / n), the last
    window moved to the edge (L - F) so the whole cell is covered. 1068 / 120 -> 10 windows,
    stride 105, the last at 948; 1068 / 224 -> 5 at 0, 211, ..., 844."""
    if length < size:
        return []
    if length == size:
        return [0]
    n = max(1, int(np.round((length - size) / (size - overlap * size))))
    stride = size - int(np.ceil(size - (length - size) / n))
    offsets = [k * stride for k in range(n + 1)]
    offsets[-1] = length - size
    return offsets


def windows(h: int, w: int, size: int = PATCH, rule: str = "majortom") -> list[tuple[int, int, int, int]]:
    """(row, col, size, size) of every window cut from an h x w tile, row by row. "majortom": Major
    TOM's fragmenter (whole coverage, about 10 % overlap; 100 windows of 120 px in a 1068 px cell);
    "grid": the CSMoE paper's disjoint grid, partial windows dropped (8 x 8 = 64)."""
    if rule == "grid":
        return [(r * size, c * size, size, size) for r in range(h // size) for c in range(w // size)]
    if rule == "majortom":
        return [(r, c, size, size) for r in fragment_offsets(h, size) for c in fragment_offsets(w, size)]
    raise RSRetrieveError(f"windows must be one of {', '.join(WINDOW_RULES)}, got {rule!r}")


def parse_time(value) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    s = str(value).strip()
    for fmt in TIME_FORMATS:
        try:
            return datetime.strptime(s.rstrip("Z"), fmt)
        except ValueError:
            pass
    m = re.search(r"(\d{8}T\d{6})", s)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S") if m else None


def parse_times(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """timestamp[ms] of a time column: timestamps as they are (time zone dropped), strings parsed
    once per distinct value, by arrow where a format fits, else `parse_time`."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        if pa.types.is_timestamp(column.type) and column.type.tz:
            column = column.cast(pa.timestamp(column.type.unit))
        return column.cast(pa.timestamp("ms"))
    distinct = pc.unique(column.cast(pa.string()))
    parsed = pc.coalesce(*[pc.strptime(distinct, format=f, unit="ms", error_is_null=True) for f in TIME_FORMATS[:3] + TIME_FORMATS[-1:]])
    if parsed.null_count > distinct.null_count:  # other formats (fractions, a "Z"): one by one
        parsed = pa.array([p if p is not None else parse_time(s) for s, p in zip(distinct.to_pylist(), parsed.to_pylist())], pa.timestamp("ms"))
    return parsed.take(pc.index_in(column.cast(pa.string()), value_set=distinct))


# -- filters --------------------------------------------------------------------------------------


def _day(value, name: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        return datetime.combine(value, datetime.min.time()) if type(value) is date else datetime.fromisoformat(str(value))
    except ValueError:
        raise RSRetrieveError(f"dates: {value!r} is not an ISO date (YYYY-MM-DD) in {name}") from None


@dataclass(frozen=True)
class Filters:
    """Which tiles of the metadata a run takes; applied before chunking. None: no restriction."""

    cells: tuple[str, ...] | None = None  # grid cell names, e.g. ("539U_97R",)
    bbox: tuple[float, float, float, float] | None = None  # min_lon, min_lat, max_lon, max_lat of the tile centre
    dates: tuple[str | None, str | None] | None = None  # first and last day (ISO, inclusive); None: open
    max_nodata: float | None = None  # the largest nodata fraction kept (metadata column `nodata`)

    @classmethod
    def build(cls, cells=None, bbox=None, dates=None, max_nodata=None) -> Filters:
        """Filters from user values, checked: one line naming the option when one is malformed."""
        from rsretrieve.geo import parse_grid_cell

        if cells is not None:
            cells = (cells,) if isinstance(cells, str) else tuple(str(c) for c in cells)
            for cell in cells:
                try:
                    parse_grid_cell(cell)
                except ValueError as e:
                    raise RSRetrieveError(f"cells: {e}") from None
        if bbox is not None:
            try:
                bbox = tuple(float(v) for v in bbox)
            except (TypeError, ValueError):
                bbox = ()
            if len(bbox) != 4 or not -90 <= bbox[1] <= bbox[3] <= 90:
                raise RSRetrieveError(f"bbox: expected (min_lon, min_lat, max_lon, max_lat) with min_lat <= max_lat, got {bbox!r}")
        if dates is not None:
            dates = (dates, dates) if isinstance(dates, str) else tuple(dates)
            if len(dates) != 2:
                raise RSRetrieveError(f"dates: expected (start, end), got {dates!r}")
            first, last = (_day(v, repr(dates)) for v in dates)
            if first and last and last < first:
                raise RSRetrieveError(f"dates: the end {dates[1]} is before the start {dates[0]}")
            dates = tuple(None if v in (None, "") else str(v) for v in dates)
        if max_nodata is not None and not 0.0 <= float(max_nodata) <= 1.0:
            raise RSRetrieveError(f"max_nodata: a fraction between 0 and 1, got {max_nodata!r}")
        return cls(cells, bbox, dates, None if max_nodata is None else float(max_nodata))

    def describe(self) -> dict:
        """The filters set, for provenance: a filtered selection is another set of patches."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items() if v is not None}

    def masks(self, table: pa.Table):
        """(description, keep mask) per filter set, in order."""
        if self.cells is not None:
            yield f"cells={list(self.cells)}", pc.is_in(table["grid_cell"], value_set=pa.array(self.cells, pa.string())).to_numpy(False)
        if self.bbox is not None:
            lon, lat = (np.asarray(table[c].to_numpy(), np.float64) for c in ("centre_lon", "centre_lat"))
            x0, y0, x1, y1 = self.bbox
            in_lon = (lon >= x0) & (lon <= x1) if x0 <= x1 else (lon >= x0) | (lon <= x1)  # across the antimeridian
            yield f"bbox={list(self.bbox)}", in_lon & (lat >= y0) & (lat <= y1)
        if self.dates is not None:
            first, last = (_day(v, "dates") for v in self.dates)
            if last is not None and len(self.dates[1]) <= 10:  # a day: all of it
                last += timedelta(days=1) - timedelta(milliseconds=1)
            ts = table["timestamp"].to_numpy(False).astype("datetime64[ms]")
            keep = ~np.isnat(ts)  # a tile of unknown date is not in any range
            if first is not None:
                keep &= ts >= np.datetime64(first, "ms")
            if last is not None:
                keep &= ts <= np.datetime64(last, "ms")
            yield f"dates={list(self.dates)}", keep
        if self.max_nodata is not None:
            nodata = np.asarray(table["nodata"].to_numpy(False), np.float64)  # unknown (null -> NaN) is not kept
            yield f"max_nodata={self.max_nodata}", nodata <= self.max_nodata


# -- the plan -------------------------------------------------------------------------------------


@dataclass
class TilePlan:
    """The tiles a run reads, in chunk order (by shard, then row)."""

    source: Path | str  # the metadata.parquet it comes from
    shards: list  # shard paths (or URLs), indexed by the `shard` column
    tiles: pa.Table  # shard, row, key, grid_cell, product_id, timestamp, centre_lat, centre_lon, crs, tile_px [, source_patch_id]
    absent: int = 0  # selected tiles whose shard was not found (left out)
    absent_shards: int = 0

    def note(self) -> str | None:
        if not self.absent:
            return None
        return located(self.source, f"{self.absent:,} selected tile(s) lie in {self.absent_shards:,} shard(s) not found beside it; "
                                    "they are left out")


def metadata_location(shards: list) -> Path | str | None:
    """The collection's metadata.parquet (beside `images/`, or beside the shards), if there is one."""
    if not shards:
        return None
    shard = str(shards[0])
    folder = shard.rsplit("/", 1)[0]
    collection = folder.rsplit("/", 1)[0] if folder.rsplit("/", 1)[-1] == "images" else folder
    if is_url(shard):
        url = remote.join(collection, METADATA_NAME)
        try:
            remote.file_size(url)
        except NotFound:
            return None
        return url
    path = Path(collection) / METADATA_NAME
    return path if path.is_file() else None


def _read_metadata(source: Path | str, extra: tuple[str, ...]) -> pa.Table:
    try:
        f = pq.ParquetFile(remote_shards.source(source), pre_buffer=is_url(source))
        names = f.schema_arrow.names
        missing = [c for c in (*NEEDED_COLUMNS, *extra) if c not in names]
        if missing:
            raise DataError(located(source, f"missing column(s) {', '.join(repr(c) for c in missing)}"))
        optional = [c for c in (SIZE_COLUMN, "source_patch_id") if c in names]
        table = f.read(columns=[*NEEDED_COLUMNS, *extra, *optional])
    except (pa.ArrowException, OSError) as e:
        raise DataError(located(source, f"unreadable parquet ({one_line(e)})")) from None
    if table.num_rows == 0:
        raise DataError(located(source, "lists no tile"))
    for column in ("grid_cell", "parquet_url", "parquet_row"):
        if table[column].null_count:
            raise DataError(located(source, f"{table[column].null_count} row(s) without {column}"))
    return table


def dictionary_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """(integer code per row, distinct values) of a column."""
    encoded = column.combine_chunks().dictionary_encode()
    return encoded.indices.to_numpy(False).astype(np.int64), encoded.dictionary.to_pylist()


def _repeat_ranks(shard_codes: np.ndarray, cell_codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row: how many earlier rows of the same shard hold the same grid cell (k of `cell.k`)."""
    order = np.lexsort((rows, cell_codes, shard_codes))
    s, c = shard_codes[order], cell_codes[order]
    new_run = np.ones(len(order), bool)
    new_run[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    starts = np.flatnonzero(new_run)
    ranks = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
    out = np.empty(len(order), np.int64)
    out[order] = ranks
    return out


def key_strings(cells: pa.Array, ranks: np.ndarray) -> pa.Array:
    """Tile keys: grid_cell for a cell's first tile in a shard, grid_cell.k for its k-th repeat."""
    k = pa.array(ranks)
    return pc.if_else(pc.equal(k, 0), cells, pc.binary_join_element_wise(cells, pc.cast(k, pa.string()), "."))


def tile_keys_of(cells: pa.ChunkedArray) -> list[str]:
    """The tile keys of one shard's rows, from its grid_cell column (row order)."""
    codes, _ = dictionary_codes(pc.fill_null(cells, ""))
    n = len(codes)
    return key_strings(cells.combine_chunks(), _repeat_ranks(np.zeros(n, np.int64), codes, np.arange(n))).to_pylist()


def _shard_index(urls: list, shards: list) -> np.ndarray:
    """Index in `shards` of each distinct parquet_url (matched by file name), -1 if absent."""
    by_name = {str(s).rsplit("/", 1)[-1]: i for i, s in enumerate(shards)}
    return np.array([by_name.get(str(u).rsplit("/", 1)[-1], -1) for u in urls], np.int64)


def plan_tiles(source: Path | str, shards: list, *, tile_size: int | None = None, filters: Filters = Filters()) -> TilePlan:
    """The tiles to read, from the metadata alone (module docstring)."""
    table = _read_metadata(source, ("nodata",) if filters.max_nodata is not None else ())
    url_codes, urls = dictionary_codes(table["parquet_url"])
    cell_codes, _ = dictionary_codes(table["grid_cell"])
    rows = table["parquet_row"].to_numpy().astype(np.int64)
    ranks = _repeat_ranks(url_codes, cell_codes, rows)  # over every row of a shard, before any filter
    try:
        table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", parse_times(table["timestamp"]))
    except (pa.ArrowException, ValueError) as e:
        raise DataError(located(source, f"unreadable timestamp column ({one_line(e)})")) from None
    keep, applied = np.ones(table.num_rows, bool), []
    for described, mask in filters.masks(table):
        keep &= mask
        if not keep.any():
            after = f" (applied after {', '.join(applied)})" if applied else ""
            raise DataError(located(source, f"no tile left after the filter {described}{after}"))
        applied.append(described)
    shard = _shard_index(urls, shards)[url_codes]
    present = keep & (shard >= 0)
    if not present.any():
        raise DataError(located(source, f"none of its {int(keep.sum()):,} selected tiles lies in a shard found beside it "
                                        f"(it names e.g. {urls[int(url_codes[np.argmax(keep)])]}; found {len(shards)} shard(s))"))
    idx = np.flatnonzero(present)
    idx = idx[np.lexsort((rows[idx], shard[idx]))]
    twice = (np.diff(shard[idx]) == 0) & (np.diff(rows[idx]) == 0)
    if twice.any():
        i = idx[int(np.argmax(twice))]
        raise DataError(located(source, f"row {rows[i]} of {urls[int(url_codes[i])]} is listed twice"))
    return TilePlan(source, list(shards), _tile_table(source, table, idx, shard, rows, ranks, tile_size),
                    int((keep & (shard < 0)).sum()), len(set(url_codes[keep & (shard < 0)].tolist())))


def _tile_table(source, table: pa.Table, idx: np.ndarray, shard: np.ndarray, rows: np.ndarray, ranks: np.ndarray,
                tile_size: int | None) -> pa.Table:
    """The selected tiles (`idx`, in plan order) with their keys and planned sizes."""
    take = pa.array(idx)
    cell = table["grid_cell"].take(take).combine_chunks()
    key = key_strings(cell, ranks[idx])
    if tile_size:
        px = np.full(len(idx), int(tile_size), np.int32)
    elif SIZE_COLUMN in table.column_names:
        px = pc.fill_null(table[SIZE_COLUMN].take(take), NOMINAL_TILE_PX).to_numpy().astype(np.int32)
    else:
        px = np.full(len(idx), NOMINAL_TILE_PX, np.int32)
    if (px <= 0).any():
        raise DataError(located(source, f"{SIZE_COLUMN} {int(px.min())}: a tile side must be positive"))
    out = {"shard": pa.array(shard[idx].astype(np.int32)), "row": pa.array(rows[idx]), "key": key, "grid_cell": cell,
           "product_id": pc.fill_null(table["product_id"].take(take).cast(pa.string()), ""),
           "timestamp": table["timestamp"].take(take), "centre_lat": table["centre_lat"].take(take).cast(pa.float64()),
           "centre_lon": table["centre_lon"].take(take).cast(pa.float64()), "crs": _crs_names(table["crs"].take(take)),
           "tile_px": pa.array(px)}
    if "source_patch_id" in table.column_names:
        out["source_patch_id"] = table["source_patch_id"].take(take)
    return pa.table(out)


def _crs_names(column: pa.ChunkedArray) -> pa.Array:
    """"EPSG:32633" for 32633, "32633" or "EPSG:32633"."""
    text = pc.utf8_trim_whitespace(column.combine_chunks().cast(pa.string()))
    bare = pc.fill_null(pc.match_substring_regex(text, r"^\d+$"), False)
    return pc.if_else(bare, pc.binary_join_element_wise("EPSG", text, ":"), text)


def window_sets(px: np.ndarray, size: int, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(window count per tile, first window of each tile's size in `all_windows`, all_windows (N, 4))."""
    sizes, code = np.unique(px, return_inverse=True)
    sets = [np.asarray(windows(int(p), int(p), size, rule), np.int32).reshape(-1, 4) for p in sizes]
    counts = np.array([len(s) for s in sets], np.int64)
    first = np.cumsum(counts) - counts
    return counts[code], first[code], np.concatenate(sets)


def plan_chunks(plan: TilePlan, dataset: str, modality: str, rel_paths: list[str], size: int = PATCH, rule: str = "majortom") -> list[Chunk]:
    """Chunks of up to `TILES_PER_CHUNK` tiles of one shard and one planned size, in plan order;
    key `<dataset>:<modality>:<shard>:rg<first row>-<last row>`."""
    tiles = plan.tiles
    shard, px = tiles["shard"].to_numpy(), tiles["tile_px"].to_numpy()
    n = len(shard)
    counts, _, _ = window_sets(px, size, rule)
    run_start = np.ones(n, bool)
    run_start[1:] = (shard[1:] != shard[:-1]) | (px[1:] != px[:-1])
    starts_of_runs = np.flatnonzero(run_start)
    position = np.arange(n) - np.repeat(starts_of_runs, np.diff(np.append(starts_of_runs, n)))
    starts = np.flatnonzero(position % TILES_PER_CHUNK == 0)
    stops = np.append(starts[1:], n)
    patches = np.add.reduceat(counts, starts).tolist()
    rows = tiles["row"].to_numpy().tolist()
    ids = pc.binary_join_element_wise(tiles["product_id"], tiles["key"], "/").to_pylist()
    paths = [str(s) for s in plan.shards]
    out = []
    for a, b, n_patches, s, p in zip(starts.tolist(), stops.tolist(), patches, shard[starts].tolist(), px[starts].tolist()):
        key = f"{dataset}:{modality}:{rel_paths[s]}:rg{rows[a]}-{rows[b - 1]}"
        out.append(Chunk(dataset, key, modality, "majortom", paths[s], (), rows[a], n_patches,
                         row_groups=tuple(rows[a:b]), tiles=tuple(ids[a:b]), tile_size=p))
    return out
