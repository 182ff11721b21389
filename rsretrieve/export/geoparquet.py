"""A store's embeddings as one GeoParquet file, laid out like Major TOM's embedding datasets.

    summary = export_geoparquet("stores/sample--csmoe-p16.zarr", "sample.parquet")        # s1 and s2
    gdf = geopandas.read_parquet("sample.parquet")                                         # or DuckDB

Columns, in order: Major TOM's (`MajorTOM/embedder/MajorTOM_Embedder.py` of ESA-PhiLab/Major-TOM
and the Core-*-SSL4EO / -SigLIP / -DINOv2 dataset cards) —

    unique_id      string   sha256 (hex) of the row: patch id, timestamp, product, geometry WKB, embedding bytes
    embedding      fixed_size_list<float32 | float16>[dim]  as stored: NOT L2-normalised
    timestamp      string   acquisition time "YYYYMMDDTHHMMSS" (Major TOM's form), null if unknown
    product_id     string
    grid_cell      string   Major TOM cell: the tile's for Major TOM stores, the patch centre's otherwise
    grid_row_u     int16
    grid_col_r     int16
    geometry       binary   WKB footprint (Polygon, lon/lat on WGS84) of the 120 px patch: 1,200 m square
                            in its UTM CRS (`rsretrieve.geo.patch_footprints`)
    centre_lat     float32  patch centre (the store's lat, lon)
    centre_lon     float32
    utm_footprint  string   WKT of the square in its UTM CRS
    utm_crs        string   "EPSG:326xx" / "EPSG:327xx"
    pixel_bbox     list<int64>[4]  [col_start, row_start, col_end, row_end] of the patch in its source image

— then rsretrieve's: `patch_id`, `pair_id`, `modality` ("s1"/"s2"), `labels` (list<string>, null
without labels), `split`, `country`, and `bbox` (struct xmin, ymin, xmax, ymax: GeoParquet 1.1's
bbox covering of `geometry`).

File metadata: "geo" (GeoParquet 1.1.0: WKB, no `crs` key, which means OGC:CRS84, i.e. lon/lat on
WGS84), `model`, `checkpoint_sha256`, `random_init` ("true" for untrained weights: such embeddings
are no results) and `rsretrieve` (JSON: each modality's full provenance, the store, the footprint rule).

Rows marked valid are written, `batch_rows` store rows at a time, one row group per batch, to a
temporary file beside the output that is renamed into place at the end: the whole store is never
in memory, and a crash leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rsretrieve import geo
from rsretrieve.errors import StoreError, located
from rsretrieve.io.jsontext import dumps as json_text
from rsretrieve.provenance import is_random_init
from rsretrieve.store import EmbeddingStore

GEOPARQUET_VERSION = "1.1.0"
DEFAULT_BATCH_ROWS = 65_536
PATCH_PX = 120  # the patch side in pixels (BigEarthNet; Major TOM windows of the CSMoE input)
PIXEL_M = 10.0  # S1 and S2 at 10 m
MODALITIES = ("s1", "s2")
MAJORTOM_COLUMNS = ("unique_id", "embedding", "timestamp", "product_id", "grid_cell", "grid_row_u", "grid_col_r",
                    "geometry", "centre_lat", "centre_lon", "utm_footprint", "utm_crs", "pixel_bbox")
OUR_COLUMNS = ("patch_id", "pair_id", "modality", "labels", "split", "country", "bbox")
_WINDOW = re.compile(r"^(\d+)_(\d+)$")  # Major TOM patch ids end in /<row>_<col> (window origin, pixels)
_BBOX = pa.struct([("xmin", pa.float64()), ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64())])


@dataclass
class ExportSummary:
    path: Path
    rows: int = 0
    rows_by_modality: dict = field(default_factory=dict)
    not_encoded: dict = field(default_factory=dict)  # rows of the store not written (not valid), per modality
    unlocated: int = 0  # rows without lat/lon: null geometry
    bytes: int = 0
    provenance: dict = field(default_factory=dict)

    @property
    def random_init(self) -> bool:
        return is_random_init(self.provenance)


def export_geoparquet(store_path: str | Path, out_path: str | Path, modality: str | Sequence[str] | None = None,
                      batch_rows: int = DEFAULT_BATCH_ROWS, on_start: Callable[[int], None] | None = None,
                      on_rows: Callable[[int], None] | None = None) -> ExportSummary:
    """Write the valid rows of a store's groups (`modality`: "s1", "s2", "both", or None for every
    group the store has) to one GeoParquet file at `out_path`. `on_start(total rows)` and
    `on_rows(rows written)` report progress. Problems with the store are `StoreError`s of one line."""
    import pyarrow.parquet as pq

    if batch_rows <= 0:
        raise ValueError("batch_rows must be positive")
    store, out = Path(store_path), Path(out_path)
    source = EmbeddingStore(store)
    groups = {m: _open_group(source, m) for m in _modalities(source, modality)}
    provenance = {m: _provenance(source, m) for m in groups}
    first = next(iter(provenance.values()))
    for m, prov in provenance.items():
        if (prov.get("model"), prov.get("checkpoint_sha256")) != (first.get("model"), first.get("checkpoint_sha256")):
            raise StoreError(located(store, f"its groups hold embeddings of different models ({m}: {prov.get('model')}); "
                                            "export them one --modality at a time"))
    dims = {int(ds.sizes["dim"]) for ds in groups.values()}
    dtypes = {np.dtype(ds["embedding"].dtype) for ds in groups.values()}
    if len(dims) > 1:
        raise StoreError(located(store, f"its groups hold embeddings of different sizes {sorted(dims)}; export them one --modality at a time"))
    value_type = pa.float16() if dtypes == {np.dtype("float16")} else pa.float32()
    valid = {m: _read(store, m, lambda ds=ds: np.asarray(ds["valid"].values, dtype=bool)) for m, ds in groups.items()}
    summary = ExportSummary(out, provenance=first)
    for m, mask in valid.items():
        summary.not_encoded[m] = int(mask.size - mask.sum())
    total = sum(int(mask.sum()) for mask in valid.values())
    if total == 0:
        raise StoreError(located(store, f"has no encoded {'/'.join(groups).upper()} patches to export; run `rsretrieve encode`"))
    geo_meta = _read(store, "", lambda: _geo_metadata(groups, valid), "(lat, lon)")
    schema = _schema(dims.pop(), value_type, {"geo": json.dumps(geo_meta), **_file_metadata(source, provenance)})
    if on_start:
        on_start(total)

    # a unique name beside the output (so the rename stays on one file system), made with the usual
    # permissions; renamed over the output only once the file is complete
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for m, ds in groups.items():
                summary.rows_by_modality[m] = 0
                labels = _label_names(ds)
                for start in range(0, valid[m].size, batch_rows):
                    stop = min(start + batch_rows, valid[m].size)
                    keep = valid[m][start:stop]
                    if not keep.any():
                        continue
                    table = _read(store, m, lambda: _batch(m, ds, start, stop, keep, labels, schema), f"rows {start}-{stop - 1}")
                    writer.write_table(table, row_group_size=table.num_rows)
                    summary.rows += table.num_rows
                    summary.rows_by_modality[m] += table.num_rows
                    summary.unlocated += table.num_rows - int(pc.sum(table["geometry"].is_valid()).as_py() or 0)
                    if on_rows:
                        on_rows(table.num_rows)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    summary.bytes = out.stat().st_size
    return summary


# -- the store, through its own API ----------------------------------------------------------------
def _modalities(source: EmbeddingStore, modality) -> list[str]:
    store = source.path
    if not (store / "zarr.json").is_file() and not any(source.has(m) for m in MODALITIES):
        raise StoreError(located(store, "no such embedding store" if not store.exists() else "not an embedding store (no zarr.json)"))
    present = source.modalities()
    if modality is None:
        if not present:
            raise StoreError(located(store, "has no embeddings yet; run `rsretrieve encode`"))
        return present
    wanted = list(MODALITIES) if modality == "both" else [modality] if isinstance(modality, str) else list(modality)
    for m in wanted:
        if m not in MODALITIES:
            raise ValueError(f"modality must be s1, s2 or both, got {m!r}")
        if m not in present:
            raise StoreError(located(store, f"has no {m.upper()} embeddings; run `rsretrieve index --modality {m}`"))
    return wanted


def _open_group(source: EmbeddingStore, modality: str):
    try:
        ds = source.open(modality, index=False)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 — zarr and xarray raise many kinds for a damaged group
        raise StoreError(located(source.path / modality, f"unreadable store group ({_short(exc)}); run `rsretrieve verify`")) from None
    for name in ("embedding", "valid", "patch_id"):
        if name not in ds.variables:
            raise StoreError(located(source.path / modality, f"not an rsretrieve store group (no `{name}`); run `rsretrieve verify`"))
    return ds


def _provenance(source: EmbeddingStore, modality: str) -> dict:
    try:
        prov = source.provenance(modality)
    except (KeyError, TypeError, ValueError):
        prov = None
    if not isinstance(prov, dict):
        raise StoreError(located(source.path / modality, "has no model provenance; not an rsretrieve store group"))
    return prov


def _read(store: Path, modality: str, what: Callable, where: str = ""):
    """Run a read of the group; a damaged chunk becomes one line naming the group."""
    try:
        return what()
    except StoreError as exc:  # found by the read itself (embeddings that are not finite)
        raise StoreError(located(store / modality, f"{where + ': ' if where else ''}{exc}; run `rsretrieve verify`")) from None
    except Exception as exc:  # noqa: BLE001 — a missing or corrupt chunk file, whatever the codec raises
        raise StoreError(located(store / modality, f"{where + ' ' if where else ''}unreadable ({_short(exc)}); "
                                                   "run `rsretrieve verify`")) from None


def _short(exc: BaseException | None) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _strings(values) -> list:
    return [None if v is None else str(v) for v in np.asarray(values).tolist()]


def _rows(ds, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one of the group's arrays: every read of per-patch data goes through
    here, a slice at a time (tests spy on it to check that the store is never read whole)."""
    return np.asarray(ds[name][start:stop].values)


def _coord(ds, name: str, start: int, stop: int):
    return _rows(ds, name, start, stop) if name in ds.variables else None


def _label_names(ds) -> list[str] | None:
    return _strings(ds["label"].values) if "labels" in ds.variables and "label" in ds.variables else None


# -- one batch of rows ------------------------------------------------------------------------------
def _batch(modality: str, ds, start: int, stop: int, keep: np.ndarray, labels: list[str] | None, schema: pa.Schema) -> pa.Table:
    import shapely

    emb = _rows(ds, "embedding", start, stop)[keep]
    ids = np.asarray(_strings(_rows(ds, "patch_id", start, stop)), dtype=object)[keep]
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        raise StoreError(f"patches {ids[~finite][:3].tolist()} are marked encoded but their embeddings are not finite "
                         "(lost chunk files?)")
    n = len(ids)

    def strings(name: str) -> list:
        values = _coord(ds, name, start, stop)
        return [None] * n if values is None else [v or None for v in np.asarray(_strings(values), dtype=object)[keep].tolist()]

    lat = _floats(_coord(ds, "lat", start, stop), keep, n)
    lon = _floats(_coord(ds, "lon", start, stop), keep, n)
    footprints = geo.patch_footprints(lat, lon, ids, size_m=PATCH_PX * PIXEL_M)
    wkb = shapely.to_wkb(footprints.wgs84)
    cells = [cell or _cell_of(la, lo) for cell, la, lo in zip(strings("grid_cell"), lat, lon)]
    rows_cols = [_grid_indices(c) for c in cells]
    timestamps = _timestamps(_coord(ds, "timestamp", start, stop), keep, n)
    products = strings("product_id")
    located_ = np.array([g is not None for g in footprints.wgs84])
    bounds = shapely.bounds(footprints.wgs84)  # NaN rows where there is no geometry
    columns = {
        "unique_id": [_unique_id(p, t, pr, w, e) for p, t, pr, w, e in zip(ids, timestamps, products, wkb, emb)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), type=schema.field("embedding").type.value_type),
                                                       emb.shape[1]),
        "timestamp": timestamps,
        "product_id": products,
        "grid_cell": cells,
        "grid_row_u": [None if rc is None else rc[0] for rc in rows_cols],
        "grid_col_r": [None if rc is None else rc[1] for rc in rows_cols],
        "geometry": wkb.tolist(),
        "centre_lat": pa.array(lat.astype(np.float32), mask=~np.isfinite(lat)),
        "centre_lon": pa.array(lon.astype(np.float32), mask=~np.isfinite(lon)),
        "utm_footprint": [None if g is None else shapely.to_wkt(g, rounding_precision=3) for g in footprints.utm],
        "utm_crs": [f"EPSG:{code}" if code else None for code in footprints.epsg.tolist()],
        "pixel_bbox": [_pixel_bbox(p) for p in ids],
        "patch_id": ids.tolist(),
        "pair_id": strings("pair_id"),
        "modality": [modality] * n,
        "labels": _labels(ds, start, stop, keep, labels, n),
        "split": strings("split"),
        "country": strings("country"),
        "bbox": pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)], fields=list(_BBOX), mask=pa.array(~located_)),
    }
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) if not isinstance(columns[f.name], pa.Array)
                                 else columns[f.name] for f in schema], schema=schema)


def _floats(values, keep: np.ndarray, n: int) -> np.ndarray:
    return np.full(n, np.nan) if values is None else np.asarray(values, dtype=np.float64)[keep]


def _timestamps(values, keep: np.ndarray, n: int) -> list:
    """Major TOM's timestamp form, "20170613T101031"."""
    if values is None:
        return [None] * n
    values = np.asarray(values)[keep]
    if np.issubdtype(values.dtype, np.datetime64):
        text = np.datetime_as_string(values.astype("datetime64[s]"), unit="s").tolist()
        return [None if t == "NaT" else t.replace("-", "").replace(":", "") for t in text]
    return [str(v).replace("-", "").replace(":", "")[:15] or None for v in values.tolist()]  # stored as text


def _labels(ds, start: int, stop: int, keep: np.ndarray, names: list[str] | None, n: int) -> list:
    if names is None:
        return [None] * n
    hot = _rows(ds, "labels", start, stop).astype(bool)[keep]
    return [[names[j] for j in np.flatnonzero(row)] for row in hot]


def _cell_of(lat: float, lon: float) -> str | None:
    if not (np.isfinite(lat) and np.isfinite(lon)):
        return None
    try:
        return geo.grid_cell(float(lat), float(lon))
    except ValueError:  # outside Major TOM's grid (beyond 85 degrees)
        return None


def _grid_indices(cell: str | None) -> tuple[int, int] | None:
    try:
        return geo.parse_grid_cell(cell) if cell else None
    except ValueError:
        return None


def _pixel_bbox(patch_id: str) -> list[int]:
    """Where the patch lies in its source image, [col_start, row_start, col_end, row_end] (the order
    Major TOM's `crop_footprint` documents): a Major TOM window from the `<row>_<col>` its id ends in,
    a BigEarthNet patch is its own 120 px image."""
    m = _WINDOW.match(patch_id.rsplit("/", 1)[-1]) if "/" in patch_id else None
    row, col = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return [col, row, col + PATCH_PX, row + PATCH_PX]


def _unique_id(patch_id: str, timestamp: str | None, product: str | None, wkb: bytes | None, embedding: np.ndarray) -> str:
    digest = hashlib.sha256(f"{patch_id}_{timestamp}_{product}_".encode())
    digest.update(wkb or b"")
    digest.update(np.ascontiguousarray(embedding, dtype=embedding.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


# -- schema and metadata ----------------------------------------------------------------------------
def _schema(dim: int, value_type: pa.DataType, metadata: dict) -> pa.Schema:
    fields = [
        ("unique_id", pa.string()), ("embedding", pa.list_(value_type, dim)), ("timestamp", pa.string()),
        ("product_id", pa.string()), ("grid_cell", pa.string()), ("grid_row_u", pa.int16()), ("grid_col_r", pa.int16()),
        ("geometry", pa.binary()), ("centre_lat", pa.float32()), ("centre_lon", pa.float32()),
        ("utm_footprint", pa.string()), ("utm_crs", pa.string()), ("pixel_bbox", pa.list_(pa.int64())),
        ("patch_id", pa.string()), ("pair_id", pa.string()), ("modality", pa.string()), ("labels", pa.list_(pa.string())),
        ("split", pa.string()), ("country", pa.string()), ("bbox", _BBOX),
    ]
    return pa.schema(fields, metadata=metadata)


def _file_metadata(source: EmbeddingStore, provenance: dict) -> dict:
    first = next(iter(provenance.values()))
    random = is_random_init(first)
    ours = {
        "store": str(source.path), "store_id": source.store_id, "modalities": list(provenance), "random_init": random,
        "embedding_normalised": False,
        "footprint": f"{PATCH_PX * PIXEL_M:.0f} m square around the patch centre in the UTM zone of its MGRS tile "
                     "(else of its position), densified and projected to WGS84 with rasterio.warp",
        "provenance": provenance,
    }
    return {"model": str(first.get("model")), "checkpoint_sha256": str(first.get("checkpoint_sha256")),
            "random_init": "true" if random else "false", "rsretrieve": json_text(ours)}


def _geo_metadata(groups: dict, valid: dict) -> dict:
    """GeoParquet 1.1 "geo" metadata, known before the rows are written: the file's bbox and geometry
    types from the footprints of the few patches that can reach its edges or the antimeridian (those
    whose centres lie within twice a footprint's half-diagonal of them), computed as the rows are."""
    import shapely

    size = PATCH_PX * PIXEL_M
    lat_margin = 2 * size * np.sqrt(0.5) / 110_000.0
    found: list = []
    for m, ds in groups.items():
        n = valid[m].size
        lat = np.asarray(ds["lat"].values, dtype=np.float64) if "lat" in ds.variables else np.full(n, np.nan)
        lon = np.asarray(ds["lon"].values, dtype=np.float64) if "lon" in ds.variables else np.full(n, np.nan)
        rows = np.flatnonzero(valid[m] & np.isfinite(lat) & np.isfinite(lon))
        if not rows.size:
            continue
        la, lo = lat[rows], lon[rows]
        widest = np.cos(np.radians(min(90.0, np.abs(la).max() + lat_margin)))
        lon_margin = min(360.0, lat_margin / max(widest, 1e-9))
        near = ((lo >= lo.max() - lon_margin) | (lo <= lo.min() + lon_margin) | (la >= la.max() - lat_margin)
                | (la <= la.min() + lat_margin) | (np.abs(lo) >= 180.0 - lon_margin))
        pick = rows[near]
        ids = _strings(ds["patch_id"].isel(patch=pick).values)
        found.extend(g for g in geo.patch_footprints(lat[pick], lon[pick], ids, size_m=size).wgs84 if g is not None)
    column = {"encoding": "WKB", "geometry_types": [], "orientation": "counterclockwise", "edges": "planar",
              "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}
    if found:
        # every footprint away from the antimeridian is a Polygon; the picked ones say if any crosses it
        column["geometry_types"] = sorted({"Polygon"} | {g.geom_type for g in found})
        column["bbox"] = shapely.total_bounds(np.array(found, dtype=object)).tolist()
    # no "crs" key: GeoParquet reads that as OGC:CRS84, longitude and latitude on WGS84
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}
