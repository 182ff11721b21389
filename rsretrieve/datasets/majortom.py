"""Major TOM Core reader (Core-S2L2A, Core-S1RTC image parquet shards).

Layout: `<root>/Core-S2L2A/images/*.parquet`, `<root>/Core-S1RTC/images/*.parquet` (a folder that
itself holds shards, or a collection folder, is accepted too). One row per row group = one tile;
band cells are single-band GeoTIFF bytes (S2 `B02..B12` at native resolution; S1 `vv`, `vh` linear
power, nodata -32768), decoded with tifffile (GDAL, through `rasterio.io.MemoryFile`, reads the
first band's georeference and anything tifffile cannot decode). The root may be a URL (s3://,
https://, hf://, any fsspec protocol): shards are then found and read by byte ranges (`majortom_remote`).

Each tile is cut into windows of 120 px at 10 m: by default with Major TOM's own fragmenting rule
(whole coverage, ~10 % overlap: 10 x 10 windows at stride 105 in a 1068 px cell, the last row and
column moved to the edge), or with `windows="grid"` the CSMoE paper's disjoint 8 x 8 grid, partial
patches discarded. The window of each patch is in its metadata. A patch with any invalid pixel is dropped and
reported in `PatchBatch.skipped`: S1 nodata (-32768), non-positive or non-finite linear power;
S2 the declared nodata, or 0 (L2A no-data) when none is declared. S1 is converted to dB
(10 log10). Pixels ship raw (`pixels.RawPixels`: S2 uint16 digital numbers, the 20 m bands at
native resolution, cut around odd windows with their place in the tile; S1 float32 dB); the
model's preprocessing does the rest, upsampling included.

Planning: with the collection's `metadata.parquet`, chunks (a few tiles of one shard) and windows
come from it alone, filters apply (`majortom_plan`); without it, one tile per chunk, its size and
georeference from the header of one band cell.

Ids: tile key = grid_cell (or `grid_cell.k` for the k-th further tile of the same cell in one
shard, which only the bundled sample has); pair_id = `<tile key>/<row>_<col>` (window origin in
pixels, the same for S1 and S2 of a cell); patch_id = `<product_id>/<tile key>/<row>_<col>`.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.bands import Modality, band_groups, bands_for
from rsretrieve.datasets import majortom_remote as remote_shards
from rsretrieve.datasets.base import PATCH, Chunk, PatchBatch, empty_batch, meta_table
from rsretrieve.datasets.majortom_plan import (FRAGMENT_OVERLAP, WINDOW_RULES, Filters, TilePlan, metadata_location, parse_time,
                                               plan_chunks, plan_tiles, tile_keys_of, windows)
from rsretrieve.datasets.majortom_windows import PlannedWindows, plan_metadata
from rsretrieve.errors import DataError, ModalityAbsent, RSRetrieveError, located
from rsretrieve.datasets.geotiff_cell import decode_band, decode_pixels
from rsretrieve.io.files import files_version
from rsretrieve.io.remote import as_location, is_url, probe, relative, unreachable
from rsretrieve.io.remote import one_line as _one_line
from rsretrieve.pixels import RawPixels, cut_windows

S1_NODATA = -32768.0
COLLECTIONS = {"s2": "S2L2A", "s1": "S1RTC"}
TIME_COLUMNS = ("product_datetime", "timestamp")
BATCH_COLUMNS = ["patch_id", "pair_id", "lat", "lon", "grid_cell", "timestamp", "product_id", "window"]


def band_columns(modality: Modality, bands: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Parquet column names of bands (S1 columns are lower case: `vv`, `vh`)."""
    bands = bands_for(modality) if bands is None else bands
    return tuple(b.lower() for b in bands) if modality == "s1" else tuple(bands)


def find_shards(root: Path | str, modality: Modality) -> list[Path] | list[str]:
    tag = COLLECTIONS[modality]
    if is_url(root):  # shard URLs (`majortom_remote`)
        return remote_shards.find_shards(str(as_location(root)), tag)
    root = Path(root)
    cands = [d for d in sorted(root.glob(f"*{tag}*")) if d.is_dir()]
    if tag in root.name:
        cands.insert(0, root)
    for d in cands:
        shards = sorted((d / "images").glob("*.parquet")) or sorted(p for p in d.glob("*.parquet") if p.name != "metadata.parquet")
        if shards:
            return shards
    return []


_SHARDS: dict[tuple[str, int | None, int], pq.FileMetaData] = {}


def shard_metadata(path: Path | str) -> pq.FileMetaData:
    """A shard's parquet footer (schema, row groups), read once per process and file version (a
    URL's: once per process): a real shard has thousands of row groups, and every chunk needs it."""
    try:
        key = (str(path), None if is_url(path) else Path(path).stat().st_mtime_ns, os.getpid())
        if key not in _SHARDS:
            _SHARDS[key] = pq.read_metadata(remote_shards.source(path))
        return _SHARDS[key]
    except (pa.ArrowException, OSError) as e:
        raise DataError(located(path, f"unreadable parquet ({_one_line(e)})")) from None


def shard_columns(path: Path, modality: Modality) -> tuple[str, list[str]]:
    """(time column name, all needed columns) of a shard; DataError if one is missing."""
    names = shard_metadata(path).schema.names
    time_col = next((c for c in TIME_COLUMNS if c in names), None)
    if time_col is None:
        raise DataError(located(path, "missing column 'product_datetime' (or 'timestamp')"))
    needed = ["product_id", "grid_cell", *band_columns(modality)]
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(located(path, f"missing column(s) {', '.join(repr(c) for c in missing)}"))
    extra = ["source_patch_id"] if "source_patch_id" in names else []
    return time_col, [*needed, time_col, *extra]


@dataclass
class TileRaster:
    """A decoded tile, raw: `fine` (C, H, W) the 10 m bands (S2 uint16 digital numbers, S1 float32
    dB), `coarse` (C', H/2, W/2) the S2 20 m bands at native resolution (None for S1), and
    `invalid` (H, W) marking pixels where any band is invalid (on the 10 m grid)."""

    fine: np.ndarray
    fine_bands: tuple[str, ...]
    coarse: np.ndarray | None
    coarse_bands: tuple[str, ...]
    invalid: np.ndarray

    def cut(self, wins: list[tuple[int, int, int, int]]) -> RawPixels:
        """Raw pixels of these windows (`pixels.cut_windows`): the 20 m bands of a window on the
        20 m grid (even origin) as its native crop; of any other, a block of the tile's 20 m pixels
        and the window's place in the tile, for the model to upsample as it would the whole tile."""
        return cut_windows(self.fine, self.fine_bands, self.coarse, self.coarse_bands, wins)


def _invalid_s1(a: np.ndarray, nodata) -> np.ndarray:
    bad = ~np.isfinite(a) | (a == S1_NODATA) | (a <= 0)
    if nodata is not None:
        bad |= a == nodata
    return bad


def tile_pixels(bands: dict[str, tuple], modality: Modality, where: str) -> TileRaster:
    """The raw raster of a tile from its decoded band cells, {column: (array, nodata)} (S1 linear
    power converted to dB)."""
    fine_names, coarse_names = band_groups(modality)
    cols = band_columns(modality)
    h, w = bands[cols[0]][0].shape
    invalid = np.zeros((h, w), bool)
    dtype = np.float32 if modality == "s1" else np.uint16
    fine = np.empty((len(fine_names), h, w), dtype)
    coarse = np.empty((len(coarse_names), h // 2, w // 2), dtype) if coarse_names else None
    for name, col in zip((*fine_names, *coarse_names), (*band_columns(modality, fine_names), *band_columns(modality, coarse_names))):
        arr, nodata = bands[col]
        if modality == "s1":
            a = arr.astype(np.float64)
            bad = _invalid_s1(a, nodata)
            with np.errstate(divide="ignore", invalid="ignore"):
                a = 10.0 * np.log10(np.where(bad, 1.0, a))
        else:
            a = arr
            bad = (a == nodata) | (a == 0) if nodata is not None else a == 0
            if a.dtype.kind == "f":
                bad |= ~np.isfinite(a)
        target, size = (fine, (h, w)) if name in fine_names else (coarse, (h // 2, w // 2))
        if a.shape != size:
            raise DataError(located(where, f"band {col} is {a.shape}, expected {size} (10 m: {(h, w)})"))
        target[(fine_names if target is fine else coarse_names).index(name)] = np.where(bad, 0, a)
        invalid |= bad if a.shape == (h, w) else bad.repeat(2, axis=0).repeat(2, axis=1)
    return TileRaster(fine, fine_names, coarse, coarse_names, invalid)


_KEYS_CACHE: dict[tuple, list[str]] = {}


def tile_keys(path: Path | str) -> list[str]:
    """Per row of a shard: grid_cell, or grid_cell.k for the k-th repeat of a cell in the shard."""
    key = (str(path), os.getpid())
    if key not in _KEYS_CACHE:
        try:
            _KEYS_CACHE[key] = tile_keys_of(remote_shards.column(path, shard_metadata(path), "grid_cell"))
        except (pa.ArrowException, OSError) as e:
            raise DataError(located(path, f"unreadable parquet ({_one_line(e)})")) from None
    return _KEYS_CACHE[key]


def _row_offsets(meta: pq.FileMetaData) -> list[int]:
    """The first row of each row group (Major TOM's shards: row i is row group i)."""
    if meta.num_rows == meta.num_row_groups:
        return list(range(meta.num_rows))
    return np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups - 1)]).tolist()


class _RowReader:
    """Rows of one shard, one row group read at a time (a chunk's rows come in order)."""

    def __init__(self, path: Path | str, columns: list[str]):
        self.path, self.columns = path, columns
        self.meta = shard_metadata(path)
        self.offsets = _row_offsets(self.meta)
        self.group: tuple[int, pa.Table] | None = None

    def row(self, row: int) -> dict:
        if not 0 <= row < self.meta.num_rows:
            raise DataError(located(self.path, f"row {row} is beyond its {self.meta.num_rows} rows"))
        rg = bisect_right(self.offsets, row) - 1
        if self.group is None or self.group[0] != rg:
            try:
                self.group = (rg, remote_shards.row_group(self.path, self.meta, rg, self.columns))
            except (pa.ArrowException, OSError) as e:  # the way failing is said so: the next run reads it again
                what = "cannot be reached" if unreachable(e) else "unreadable"
                raise DataError(located(self.path, f"row group {rg} {what} ({_one_line(e)})")) from None
        table, i = self.group[1], row - self.offsets[rg]
        return {c: table.column(c)[i].as_py() for c in self.columns}


@dataclass
class _Collected:
    """What a chunk's tiles yield: meta rows (patch ids first), pixels, and what was skipped."""

    columns: list[str]
    rows: list[dict] = field(default_factory=list)
    parts: list[RawPixels] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def batch(self, modality: Modality, size: int) -> PatchBatch:
        if not self.rows:
            return empty_batch(modality, self.columns, self.skipped)
        pixels = RawPixels.concat(self.parts) if self.parts else RawPixels.empty(modality, size)
        meta = meta_table({c: [row.get(c) for row in self.rows] for c in self.columns})
        return PatchBatch(pixels, [row["patch_id"] for row in self.rows], meta, self.skipped)


class MajorTOMDataset:
    """Major TOM Core S2L2A / S1RTC shards, cut into 120 px patches. Filters (with the collection's
    metadata.parquet only): `cells` (grid cell names), `bbox` (min_lon, min_lat, max_lon, max_lat of
    the tile centre), `dates` (first, last day, ISO, inclusive), `max_nodata` (a fraction)."""

    def __init__(self, root: Path | str, *, dataset_name: str = "majortom", patch_size: int = PATCH,
                 tile_size: int | None = None, windows: str = "majortom", cells=None, bbox=None, dates=None,
                 max_nodata: float | None = None):
        self.root = as_location(root)  # a URL stays a string
        self.name = dataset_name
        if patch_size != PATCH:
            raise RSRetrieveError(f"patch_size must be {PATCH} (the model's BigEarthNet patch size)")
        if windows not in WINDOW_RULES:
            raise RSRetrieveError(f"windows must be one of {', '.join(WINDOW_RULES)}, got {windows!r}")
        self.patch_size, self.tile_size, self.window_rule = patch_size, tile_size, windows
        self.filters = Filters.build(cells, bbox, dates, max_nodata)
        if isinstance(self.root, str):
            probe(self.root)  # one line when the host cannot be reached
        elif not self.root.exists():
            raise DataError(located(self.root, "dataset root not found"))
        self._cache: dict = {}

    def __getstate__(self):
        return {**self.__dict__, "_cache": {}}  # workers plan nothing: a chunk carries what it reads

    def describe(self) -> dict:
        """How patches are cut and which tiles are taken, for the store's provenance."""
        # coarse "model": odd windows' 20 m bands reach the model raw (`cut_windows`); a store written
        # before this was recorded holds the reader's nearest upsampling there (provenance.upsampling_differences)
        out = {"windows": self.window_rule, "patch_size": self.patch_size,
               "overlap": FRAGMENT_OVERLAP if self.window_rule == "majortom" else 0.0, "coarse": "model"}
        return {**out, "filters": self.filters.describe()} if self.filters.describe() else out

    def shards(self, modality: Modality) -> list[Path] | list[str]:
        shards = find_shards(self.root, modality)
        if not shards:
            raise ModalityAbsent(located(self.root, f"no Core-{COLLECTIONS[modality]} parquet shards found"))
        return shards

    def plan(self, modality: Modality) -> TilePlan | None:
        """The tiles planned from the collection's metadata.parquet; None without one."""
        key = ("plan", modality, self._version(modality))  # data that grew (a new shard) is planned again
        if key not in self._cache:
            shards = self.shards(modality)
            source = metadata_location(shards)
            if source is None and self.filters.describe():
                raise DataError(located(self.root, f"the filters {self.filters.describe()} need Core-{COLLECTIONS[modality]}'s "
                                                   "metadata.parquet beside its shards; none found"))
            self._cache[key] = None if source is None else plan_tiles(source, shards, tile_size=self.tile_size, filters=self.filters)
        return self._cache[key]

    def _version(self, modality: Modality) -> tuple:
        """What identifies the local data of a modality now: its shards' and metadata's names, sizes, mtimes."""
        if isinstance(self.root, str):
            return ()
        shards = self.shards(modality)
        return files_version([*shards, metadata_location(shards) or shards[0]])

    def count_message(self) -> str | None:
        """Tiles the metadata selects whose shards are absent (a partial download), if any."""
        notes = [plan.note() for key, plan in self._cache.items() if key[0] == "plan" and plan is not None and plan.note()]
        return "; ".join(notes) or None

    def _relative(self, shard: Path | str) -> str:
        if isinstance(shard, str):
            return relative(shard, self.root)
        return (shard.relative_to(self.root) if shard.is_relative_to(self.root) else shard).as_posix()

    def chunks(self, modality: Modality) -> list[Chunk]:
        plan = self.plan(modality)
        if plan is not None:
            key = ("chunks", modality, id(plan))
            if key not in self._cache:
                rel = [self._relative(s) for s in plan.shards]
                self._cache[key] = plan_chunks(plan, self.name, modality, rel, self.patch_size, self.window_rule)
            return list(self._cache[key])
        out = []
        for shard in self.shards(modality):
            shard_columns(shard, modality)
            n_rg = shard_metadata(shard).num_row_groups
            if n_rg == 0:
                raise DataError(located(shard, "empty parquet shard (no row groups)"))
            rel = self._relative(shard)
            out += [Chunk(self.name, f"{self.name}:{modality}:{rel}:rg{rg}", modality, "majortom", str(shard), (), rg, 0) for rg in range(n_rg)]
        if isinstance(self.root, str):  # over a URL: several tiles' headers at once, the result kept on disk
            settings = {**self.describe(), "tile_size": self.tile_size, "modality": modality}
            found = remote_shards.candidates(out, lambda chunk: self.read_chunk(chunk, _header_only=True), settings)
            self._cache.update({("candidates", key): table for key, table in found.items()})
        # the encoder stage allocates rows per chunk up front: count each tile's windows
        return [replace(chunk, n_patches=self._candidates(chunk).num_rows) for chunk in out]

    def _candidates(self, chunk: Chunk) -> pa.Table:
        """Every full window of a chunk's tile, from the header of its first band cell (`tile_size`:
        the size from it; lat/lon from the header still)."""
        key = ("candidates", chunk.key)
        if key not in self._cache:
            self._cache[key] = self.read_chunk(chunk, _header_only=True).meta
        return self._cache[key]

    def read_chunk(self, chunk: Chunk, *, _header_only: bool = False) -> PatchBatch:
        """The chunk's tiles, decoded and cut. A planned chunk's ids are the planned ones; of a tile
        not of the planned size, the planned windows it lacks are listed in `skipped`."""
        modality, path = chunk.modality, as_location(chunk.path)
        columns = list(BATCH_COLUMNS)
        try:
            time_col, needed = shard_columns(path, modality)
            if _header_only:
                needed = [c for c in needed if c not in band_columns(modality)[1:]]
            reader = _RowReader(path, needed)
            columns += ["source_patch_id"] if "source_patch_id" in needed else []
            tiles = list(zip(chunk.row_groups, chunk.tiles)) if chunk.row_groups else self._shard_tiles(reader, chunk.row_group)
        except DataError as e:  # a planned chunk names each tile lost; a shard's one tile, its row group
            return empty_batch(modality, columns, [(tile, str(e)) for tile in chunk.tiles or [f"{path}:rg{chunk.row_group}"]])
        out = _Collected(columns)
        for row, tile in tiles:
            where = f"{path}:row {row}"
            try:
                data = reader.row(row)
            except DataError as e:
                if not chunk.row_groups:  # as before planning: the chunk's one row group
                    return empty_batch(modality, columns, [(f"{path}:rg{chunk.row_group}", str(e))])
                out.skipped.append((tile, str(e)))
                continue
            product, _, key = tile.rpartition("/") if chunk.row_groups else (data["product_id"] or "", "", tile)
            if chunk.row_groups and (data["product_id"] or "", data["grid_cell"]) != (product, key.split(".")[0]):
                out.skipped.append((tile, located(where, f"holds {data['product_id']} {data['grid_cell']}, metadata.parquet planned {tile}")))
                continue  # metadata and shard disagree: no patch under another tile's id
            self._cut_tile(out, data, product, key, where, chunk.tile_size, time_col, modality, _header_only)
        return out.batch(modality, self.patch_size)

    @staticmethod
    def _shard_tiles(reader: _RowReader, rg: int) -> list[tuple[int, str]]:
        """(row, tile key) of a row group's tiles, keys from the shard's grid cells."""
        if not 0 <= rg < reader.meta.num_row_groups:
            raise DataError(located(reader.path, f"no row group {rg}"))
        first, keys = reader.offsets[rg], tile_keys(reader.path)
        return [(row, keys[row]) for row in range(first, first + reader.meta.row_group(rg).num_rows)]

    def _cut_tile(self, out: _Collected, data: dict, product: str, key: str, where: str, planned: int, time_col: str,
                  modality: Modality, header_only: bool) -> None:
        """Decode one tile (or only its header) and add its windows; `planned`: the side the plan
        counted windows for (0: cut what the tile holds)."""
        from rsretrieve.geo import pixel_to_xy, to_wgs84

        first_col, raster = band_columns(modality)[0], None
        try:  # the first band's GeoTIFF header: size, georeference
            ref = decode_band(data[first_col], f"{where}:{first_col}", header_only=True)
            h, w = (self.tile_size, self.tile_size) if header_only and self.tile_size and not planned else ref[0]
            if not header_only:
                decoded = {col: decode_pixels(data[col], f"{where}:{col}") for col in band_columns(modality)}
                h, w = decoded[first_col][0].shape
                raster = tile_pixels(decoded, modality, where)
        except DataError as e:
            out.skipped.append((f"{product}/{key}", str(e)))
            return
        wins = windows(h, w, self.patch_size, self.window_rule)
        if planned:  # the planned windows the tile holds; the others are named, not guessed
            held, wins = set(wins), windows(planned, planned, self.patch_size, self.window_rule)
            out.skipped += [(f"{product}/{key}/{win[0]}_{win[1]}", located(where, f"tile is {h}x{w} px, metadata planned {planned}x{planned}"))
                            for win in wins if win not in held]
            wins = [win for win in wins if win in held]
        elif not wins:
            out.skipped.append((f"{product}/{key}", located(where, f"tile {h}x{w} px is smaller than {self.patch_size} px")))
            return
        lat = lon = [None] * len(wins)
        if ref[2] is not None and wins:
            xs, ys = zip(*[pixel_to_xy(ref[1], c + ww / 2.0, r + hh / 2.0) for r, c, hh, ww in wins])
            lat, lon = (v.tolist() for v in to_wgs84(ref[2], list(xs), list(ys)))
        common = {"grid_cell": data["grid_cell"], "timestamp": parse_time(data[time_col]), "product_id": product,
                  "source_patch_id": data.get("source_patch_id")}
        kept = []
        for j, (r, c, hh, ww) in enumerate(wins):
            patch_id = f"{product}/{key}/{r}_{c}"
            if raster is not None:
                bad = int(raster.invalid[r : r + hh, c : c + ww].sum())
                if bad:
                    out.skipped.append((patch_id, located(where, f"window {r},{c}: {bad} invalid pixel(s) (nodata, non-positive or non-finite)")))
                    continue
                kept.append((r, c, hh, ww))
            out.rows.append({**common, "patch_id": patch_id, "pair_id": f"{key}/{r}_{c}", "lat": lat[j], "lon": lon[j], "window": [r, c, hh, ww]})
        if kept:
            out.parts.append(raster.cut(kept))

    def patch_rows(self, modality: Modality) -> PlannedWindows | pa.Table:
        """The candidate patches, made a slice at a time when planned from metadata.parquet (Major
        TOM Core's 144 M windows are never one table), else `metadata(locations=False)`."""
        plan = self.plan(modality)
        if plan is None:
            return self.metadata(modality, locations=False)
        return PlannedWindows(plan, self.patch_size, self.window_rule)

    def metadata(self, modality: Modality, locations: bool = True) -> pa.Table:
        """All candidate patches (every full 120 px window of every tile), in chunk order, read-time
        drops included: from metadata.parquet alone (lat/lon with `locations` only), else from one
        band cell's header per tile, never its pixels (lat/lon whatever `locations` says)."""
        plan = self.plan(modality)
        key = ("metadata", modality, locations if plan is not None else None, id(plan) if plan is not None else self._version(modality))
        if key not in self._cache and plan is not None:
            self._cache[key] = plan_metadata(plan, self.patch_size, self.window_rule, locations)
        elif key not in self._cache:
            tables = [t for t in (self._candidates(ch) for ch in self.chunks(modality)) if t.num_rows]
            self._cache[key] = pa.concat_tables(tables, promote_options="default") if tables else meta_table({c: [] for c in BATCH_COLUMNS})
        return self._cache[key]
