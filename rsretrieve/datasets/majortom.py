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
(10 log10). Pixels ship raw (`preprocess.RawPixels`: S2 uint16 digital numbers, the 20 m bands at
native resolution where the windows allow; S1 float32 dB); the model's preprocessing does the rest.

Ids: tile key = grid_cell (or `grid_cell.k` for the k-th further tile of the same cell in one
shard, which only the bundled sample has); pair_id = `<tile key>/<row>_<col>` (window origin in
pixels, the same for S1 and S2 of a cell); patch_id = `<product_id>/<tile key>/<row>_<col>`.
"""

from __future__ import annotations

import os
import re
from datetime import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.bands import Modality, band_groups, bands_for
from rsretrieve.datasets import majortom_remote as remote_shards
from rsretrieve.datasets.base import PATCH, Chunk, PatchBatch, empty_batch, meta_table
from rsretrieve.errors import DataError, RSRetrieveError, located
from rsretrieve.io.remote import as_location, is_url, probe, relative
from rsretrieve.preprocess import RawPixels

S1_NODATA = -32768.0
COLLECTIONS = {"s2": "S2L2A", "s1": "S1RTC"}
TIME_COLUMNS = ("product_datetime", "timestamp")
BATCH_COLUMNS = ["patch_id", "pair_id", "lat", "lon", "grid_cell", "timestamp", "product_id", "window"]


def band_columns(modality: Modality, bands: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """Parquet column names of bands (S1 columns are lower case: `vv`, `vh`)."""
    bands = bands_for(modality) if bands is None else bands
    return tuple(b.lower() for b in bands) if modality == "s1" else tuple(bands)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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


def parse_time(value) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    s = str(value).strip()
    for fmt in ("%Y%m%dT%H%M%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f",
                "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d"):
        try:
            return datetime.strptime(s.rstrip("Z"), fmt)
        except ValueError:
            pass
    m = re.search(r"(\d{8}T\d{6})", s)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S") if m else None


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
            nodata = page.tags.get(42113)  # GDAL_NODATA, an ASCII number
            return page.asarray(), (float(nodata.value.strip("\x00 ")) if nodata is not None else None)
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
            first = (ds.height, ds.width) if header_only else ds.read(1)
            return first, ds.transform, ds.crs, ds.nodata
    except Exception as e:
        raise DataError(located(where, f"undecodable GeoTIFF cell ({_one_line(e)})")) from None


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
        """Raw pixels of these windows. The 20 m bands stay at native resolution when every window
        lies on the 20 m grid (even origin and size); otherwise they are cut from a nearest
        upsampling to 10 m, the only way to cut them at odd positions."""
        fine = np.stack([self.fine[:, r : r + h, c : c + w] for r, c, h, w in wins])
        if self.coarse is None:
            return RawPixels(fine, self.fine_bands)
        if all(v % 2 == 0 for win in wins for v in win):
            coarse = np.stack([self.coarse[:, r // 2 : (r + h) // 2, c // 2 : (c + w) // 2] for r, c, h, w in wins])
            return RawPixels(fine, self.fine_bands, coarse, self.coarse_bands)
        up = np.stack([self.coarse[:, (r + np.arange(h))[:, None] // 2, (c + np.arange(w))[None, :] // 2] for r, c, h, w in wins])
        return RawPixels(np.concatenate([fine, up], axis=1), self.fine_bands + self.coarse_bands)


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


_KEYS_CACHE: dict[tuple, list[str]] = {}


def tile_keys(path: Path | str) -> list[str]:
    """Per row of a shard: grid_cell, or grid_cell.k for the k-th repeat of a cell in the shard."""
    key = (str(path), os.getpid())
    if key not in _KEYS_CACHE:
        try:
            cells = remote_shards.column(path, shard_metadata(path), "grid_cell").to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(located(path, f"unreadable parquet ({_one_line(e)})")) from None
        seen: dict[str, int] = {}
        out = []
        for c in cells:
            k = seen.get(c, 0)
            seen[c] = k + 1
            out.append(c if k == 0 else f"{c}.{k}")
        _KEYS_CACHE[key] = out
    return _KEYS_CACHE[key]


def _row_offsets(meta: pq.FileMetaData) -> list[int]:
    offs, n = [], 0
    for i in range(meta.num_row_groups):
        offs.append(n)
        n += meta.row_group(i).num_rows
    return offs


class MajorTOMDataset:
    """Major TOM Core S2L2A / S1RTC shards, cut into 120 px patches."""

    def __init__(self, root: Path | str, *, dataset_name: str = "majortom", patch_size: int = PATCH,
                 tile_size: int | None = None, windows: str = "majortom"):
        self.root = as_location(root)  # a URL stays a string
        self.name = dataset_name
        if patch_size != PATCH:
            raise RSRetrieveError(f"patch_size must be {PATCH} (the model's BigEarthNet patch size)")
        if windows not in WINDOW_RULES:
            raise RSRetrieveError(f"windows must be one of {', '.join(WINDOW_RULES)}, got {windows!r}")
        self.patch_size = patch_size
        self.tile_size = tile_size
        self.window_rule = windows
        if isinstance(self.root, str):
            probe(self.root)  # one line when the host cannot be reached
        elif not self.root.exists():
            raise DataError(located(self.root, "dataset root not found"))
        self._cache: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def describe(self) -> dict:
        """How patches are cut, for the store's provenance."""
        return {"windows": self.window_rule, "patch_size": self.patch_size,
                "overlap": FRAGMENT_OVERLAP if self.window_rule == "majortom" else 0.0}

    def shards(self, modality: Modality) -> list[Path] | list[str]:
        shards = find_shards(self.root, modality)
        if not shards:
            raise DataError(located(self.root, f"no Core-{COLLECTIONS[modality]} parquet shards found"))
        return shards

    def chunks(self, modality: Modality) -> list[Chunk]:
        out = []
        for shard in self.shards(modality):
            shard_columns(shard, modality)
            n_rg = shard_metadata(shard).num_row_groups
            if n_rg == 0:
                raise DataError(located(shard, "empty parquet shard (no row groups)"))
            if isinstance(shard, str):
                rel = relative(shard, self.root)
            else:
                rel = (shard.relative_to(self.root) if shard.is_relative_to(self.root) else shard).as_posix()
            out += [Chunk(self.name, f"{self.name}:{modality}:{rel}:rg{rg}", modality, "majortom", str(shard), (), rg, 0) for rg in range(n_rg)]
        if isinstance(self.root, str):  # over a URL: several tiles' headers at once, the result kept on disk
            settings = {**self.describe(), "tile_size": self.tile_size, "modality": modality}
            found = remote_shards.candidates(out, lambda chunk: self.read_chunk(chunk, _header_only=True), settings)
            self._cache.update({("candidates", key): table for key, table in found.items()})
        # the encoder stage allocates rows per chunk up front: count each tile's windows
        return [replace(chunk, n_patches=self._candidates(chunk).num_rows) for chunk in out]

    def _candidates(self, chunk: Chunk) -> pa.Table:
        """Every full window of a chunk's tile, from the GeoTIFF header of its first band cell (no
        pixels decoded); with `tile_size` the size is taken from it, the header still gives the
        georeference for lat/lon."""
        key = ("candidates", chunk.key)
        if key not in self._cache:
            self._cache[key] = self.read_chunk(chunk, _header_only=True).meta
        return self._cache[key]

    def _read_rows(self, chunk: Chunk, columns: list[str]) -> tuple[pa.Table, int]:
        path = as_location(chunk.path)
        try:
            meta = shard_metadata(path)
            table = remote_shards.row_group(path, meta, chunk.row_group, columns)
            first = _row_offsets(meta)[chunk.row_group]
        except (pa.ArrowException, OSError) as e:
            raise DataError(located(path, f"unreadable row group {chunk.row_group} ({_one_line(e)})")) from None
        return table, first

    def read_chunk(self, chunk: Chunk, *, _header_only: bool = False) -> PatchBatch:
        from rsretrieve.geo import pixel_to_xy, to_wgs84

        modality = chunk.modality
        path = as_location(chunk.path)
        cols_meta = list(BATCH_COLUMNS)
        try:
            time_col, columns = shard_columns(path, modality)
            if _header_only:
                columns = [c for c in columns if c not in band_columns(modality)[1:]]
            table, first = self._read_rows(chunk, columns)
            keys = tile_keys(path)
        except DataError as e:
            return empty_batch(modality, cols_meta, [(f"{path}:rg{chunk.row_group}", str(e))])
        has_src = "source_patch_id" in table.column_names
        if has_src:
            cols_meta.append("source_patch_id")
        data = {c: table.column(c).to_pylist() for c in table.column_names}
        parts, ids, skipped = [], [], []
        meta: dict[str, list] = {c: [] for c in cols_meta}
        for i in range(table.num_rows):
            key = keys[first + i]
            product = data["product_id"][i] or ""
            where = f"{path}:row {first + i}"
            try:
                raster = None
                if _header_only:
                    # the first band's GeoTIFF header only (size, georeference), no pixels
                    first_col = band_columns(modality)[0]
                    ref = decode_band(data[first_col][i], f"{where}:{first_col}", header_only=True)
                    h, w = (self.tile_size, self.tile_size) if self.tile_size else ref[0]
                else:
                    first_col = band_columns(modality)[0]
                    ref = decode_band(data[first_col][i], f"{where}:{first_col}", header_only=True)  # georeference
                    decoded = {col: decode_pixels(data[col][i], f"{where}:{col}") for col in band_columns(modality)}
                    h, w = decoded[first_col][0].shape
                    raster = tile_pixels(decoded, modality, where)
            except DataError as e:
                skipped.append((f"{product}/{key}", str(e)))
                continue
            wins = windows(h, w, self.patch_size, self.window_rule)
            if not wins:
                skipped.append((f"{product}/{key}", located(where, f"tile {h}x{w} px is smaller than {self.patch_size} px")))
                continue
            transform, crs = ref[1], ref[2]
            lat = lon = [None] * len(wins)
            if crs is not None:
                xs, ys = zip(*[pixel_to_xy(transform, c + ww / 2.0, r + hh / 2.0) for r, c, hh, ww in wins])
                la, lo = to_wgs84(crs, list(xs), list(ys))
                lat, lon = la.tolist(), lo.tolist()
            ts = parse_time(data[time_col][i])
            kept = []
            for j, (r, c, hh, ww) in enumerate(wins):
                pair_id = f"{key}/{r}_{c}"
                patch_id = f"{product}/{pair_id}"
                if raster is not None:
                    bad = int(raster.invalid[r : r + hh, c : c + ww].sum())
                    if bad:
                        skipped.append((patch_id, located(where, f"window {r},{c}: {bad} invalid pixel(s) (nodata, non-positive or non-finite)")))
                        continue
                    kept.append((r, c, hh, ww))
                ids.append(patch_id)
                for col, val in (("patch_id", patch_id), ("pair_id", pair_id), ("lat", lat[j]), ("lon", lon[j]),
                                 ("grid_cell", data["grid_cell"][i]), ("timestamp", ts), ("product_id", product),
                                 ("window", [r, c, hh, ww])):
                    meta[col].append(val)
                if has_src:
                    meta["source_patch_id"].append(data["source_patch_id"][i])
            if kept:
                parts.append(raster.cut(kept))
        if not ids:
            return empty_batch(modality, cols_meta, skipped)
        pixels = RawPixels.concat(parts) if parts else RawPixels.empty(modality, self.patch_size)
        return PatchBatch(pixels, ids, meta_table(meta), skipped)

    def metadata(self, modality: Modality, locations: bool = True) -> pa.Table:
        """All candidate patches (every full 120 px window of every tile), in chunk order. Reads
        the GeoTIFF header of one band cell per tile for its size and georeference, never its
        pixels (`tile_size` fixes the size; the header still gives lat/lon, whatever `locations`
        says); patches dropped at read time for invalid pixels are still listed here."""
        key = ("metadata", modality)
        if key not in self._cache:
            tables = [self._candidates(ch) for ch in self.chunks(modality)]
            tables = [t for t in tables if t.num_rows]
            if tables:
                self._cache[key] = pa.concat_tables(tables, promote_options="default")
            else:
                self._cache[key] = meta_table({c: [] for c in BATCH_COLUMNS})
        return self._cache[key]
