"""Query results and their outputs: one row per (query, rank), as a DataFrame, JSON Lines, CSV,
JSON, GeoJSON (footprints) or GeoParquet (points), and the data of the HTML map page.

    results = archive.query_tiles(paths, target="s2", k=10)
    df = results.to_dataframe()                       # or results_to_dataframe([...])
    save_results(results, "hits.parquet")             # the format from the suffix
    results_geojson(results)                          # each query's footprint and its hits' squares

Every row carries `random_init`: scores of a model without trained weights are no results, and a
file read later must still say so. pandas, pyarrow and shapely load only when a format needs them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import RSRetrieveError, located
from rsretrieve.io.jsontext import dumps as json_text
from rsretrieve.pixels import RawPixels
from rsretrieve.provenance import is_random_init

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("query", "query_modality", "target", "rank", "patch_id", "pair_id", "score", "labels", "split", "lat", "lon", "random_init")
FORMATS = ("jsonl", "csv", "json", "geojson", "geoparquet")
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "json", ".geojson": "geojson",
            ".parquet": "geoparquet", ".geoparquet": "geoparquet"}
GEOPARQUET_VERSION = "1.1.0"


@dataclass
class Hit:
    rank: int
    patch_id: str
    pair_id: str
    score: float
    labels: list[str]
    split: str
    lat: float | None
    lon: float | None
    row: int


@dataclass
class QueryResult:
    query_label: str  # for people: "name (S2, 120 x 120 px, 1 patch)" or "<patch id> (S2)"
    query_modality: Modality
    target: Modality
    hits: list[Hit]
    provenance: dict
    query_pixels: RawPixels | None = field(default=None, repr=False)  # the query's (first) patch, raw; read again when None
    source: str = ""  # for machines: the tile's path as given, or the archive patch id
    kind: Literal["tile", "id"] = "tile"
    # WGS84 outline (shapely, lon/lat, counterclockwise): a tile's raster bounds, an archive patch's
    # 1,200 m square; None when the query is not georeferenced
    query_footprint: object | None = field(default=None, repr=False)

    @property
    def random_init(self) -> bool:
        return is_random_init(self.provenance)

    def to_dict(self) -> dict:
        return {
            "query": self.source or self.query_label,
            "query_label": self.query_label,
            "query_kind": self.kind,
            "query_modality": self.query_modality,
            "target": self.target,
            "random_init": self.random_init,
            "provenance": {k: self.provenance.get(k) for k in ("model", "checkpoint_sha256", "checkpoint_path")},
            "results": [asdict(h) for h in self.hits],
        }

    def to_geojson(self) -> dict:
        return results_geojson([self])

    def rows(self) -> list[dict]:
        """One flat record per hit, with the columns `COLUMNS` (labels as a list)."""
        query = self.source or self.query_label
        return [{"query": query, "query_modality": self.query_modality, "target": self.target, "rank": h.rank,
                 "patch_id": h.patch_id, "pair_id": h.pair_id, "score": h.score, "labels": list(h.labels), "split": h.split,
                 "lat": _coordinate(h.lat), "lon": _coordinate(h.lon), "random_init": self.random_init} for h in self.hits]

    def to_dataframe(self) -> "pd.DataFrame":
        return results_to_dataframe([self])


class QueryResults(list):
    """The results of a batch of queries, in the order given, without the queries that failed:
    those are in `failed` as (tile path or patch id, one-line reason). `notes`: one-line remarks
    for the user (e.g. fewer results than asked: the archive is smaller than k)."""

    def __init__(self, results: Iterable[QueryResult] = (), failed: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()):
        super().__init__(results)
        self.failed: list[tuple[str, str]] = list(failed)
        self.notes: list[str] = list(notes)

    def to_dataframe(self) -> "pd.DataFrame":
        return results_to_dataframe(self)

    def rows(self) -> list[dict]:
        return result_rows(self)


@dataclass
class QueryStats:
    """What an Archive's queries have cost so far: the CLI's summary line, and benchmarks."""

    model_loads: int = 0
    faiss_searches: int = 0
    model_s: float = 0.0  # loading the model
    embed_s: float = 0.0  # reading query tiles (or stored embeddings) and embedding them, model load excluded
    search_s: float = 0.0  # faiss, and reading the hits' labels and coordinates

    def summary(self, n_queries: int) -> str:
        loads = {0: "no model needed", 1: f"model loaded once ({self.model_s:.1f} s)"}.get(self.model_loads, f"model loaded {self.model_loads} times")
        calls = f"{self.faiss_searches} faiss search{'es' if self.faiss_searches != 1 else ''}"
        return f"{n_queries} quer{'ies' if n_queries != 1 else 'y'}: {loads}, embedding {self.embed_s:.1f} s, {calls} {self.search_s:.2f} s"


def short_id(patch_id: str) -> str:
    """The distinctive tail of a patch name (tile, row, col) for captions: the full id is long."""
    parts = patch_id.replace("/", "_").split("_")
    return "_".join(parts[-3:]) if len(parts) > 3 else patch_id


def short_query(result: QueryResult) -> str:
    """A query's name for a narrow table: a patch id's tail, or a file's name without folders."""
    if result.kind == "id":
        return short_id(result.source)
    path = Path(result.source or result.query_label)
    return short_id(path.stem if path.suffix.lower() in (".tif", ".tiff") else path.name)


def labels_brief(labels: Sequence[str], keep: int = 2) -> str:
    """'Arable land; Pastures +3': the first labels and how many more, for narrow tables."""
    more = len(labels) - keep
    return "; ".join(labels[:keep]) + (f" +{more}" if more > 0 else "") if labels else "-"


def _coordinate(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)


# -- tables ---------------------------------------------------------------------------------------
def result_rows(results: Iterable[QueryResult]) -> list[dict]:
    return [row for result in results for row in result.rows()]


def results_to_dataframe(results: Iterable[QueryResult]) -> "pd.DataFrame":
    """One pandas DataFrame of every hit of every query: the columns `COLUMNS`, labels as lists,
    lat/lon NaN where the archive has no coordinates."""
    import pandas as pd

    frame = pd.DataFrame(result_rows(results), columns=list(COLUMNS))
    return frame.astype({"rank": "int64", "score": "float64", "lat": "float64", "lon": "float64", "random_init": "bool"})


# -- machine formats --------------------------------------------------------------------------------
def format_for(path: str | Path) -> str:
    """The output format a file name asks for (its suffix), else a one-line RSRetrieveError."""
    fmt = SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        known = " ".join(sorted(SUFFIXES))
        raise RSRetrieveError(located(path, f"cannot tell the format from the suffix; use one of {known}, or give --format"))
    return fmt


def results_json(results: Sequence[QueryResult], single: bool = False) -> object:
    """A list of `QueryResult.to_dict()`, or the one object when `single`."""
    return results[0].to_dict() if single and len(results) == 1 else [r.to_dict() for r in results]


def hit_footprints(results: Sequence[QueryResult]) -> list[list]:
    """Per query, the WGS84 footprint of each hit (shapely Polygon in lon/lat, counterclockwise; a
    MultiPolygon cut at the antimeridian; None without coordinates): the 1,200 m square around its
    stored centre in the UTM zone of its MGRS tile (`rsretrieve.geo.patch_footprints`, one projection
    per zone for the whole batch)."""
    from rsretrieve.geo import patch_footprints

    hits = [h for r in results for h in r.hits]
    if not hits:
        return [[] for _ in results]
    nan = float("nan")
    shapes = patch_footprints([nan if h.lat is None else h.lat for h in hits], [nan if h.lon is None else h.lon for h in hits],
                              [h.patch_id for h in hits]).wgs84.tolist()
    ends = np.cumsum([len(r.hits) for r in results]).tolist()
    return [shapes[a:b] for a, b in zip([0, *ends[:-1]], ends)]


def geometry_json(geometry, digits: int = 7) -> dict | None:
    """A shapely geometry as a GeoJSON geometry object (lists, coordinates rounded to `digits`
    decimals: 1e-7 degrees is about 1 cm), or None."""
    if geometry is None:
        return None
    import shapely

    rounded = shapely.transform(geometry, lambda xy: np.round(xy, digits))
    return json.loads(json.dumps(shapely.geometry.mapping(rounded)))


def results_geojson(results: Sequence[QueryResult]) -> dict:
    """One RFC 7946 FeatureCollection: per query, a feature for the query (role "query": a tile's
    raster outline, an archive patch's square, null geometry when not georeferenced), then one per
    hit (role "result": its footprint Polygon, null without coordinates), with the row's columns
    (`COLUMNS`; lat, lon = the patch centre) as properties. Coordinates lon, lat on WGS84, exterior
    rings counterclockwise (the right-hand rule)."""
    features = []
    for result, shapes in zip(results, hit_footprints(results)):
        query = result.source or result.query_label
        features.append({"type": "Feature", "geometry": geometry_json(result.query_footprint),
                         "properties": {"role": "query", "query": query, "modality": result.query_modality, "query_label": result.query_label,
                                        "query_kind": result.kind, "target": result.target, "random_init": result.random_init}})
        for row, shape in zip(result.rows(), shapes):
            features.append({"type": "Feature", "geometry": geometry_json(shape), "properties": {"role": "result", **row}})
    first = results[0] if results else None
    properties = {"random_init": any(r.random_init for r in results),
                  "target": first.target if first else None,
                  "provenance": first.to_dict()["provenance"] if first else None,
                  "queries": [r.source or r.query_label for r in results]}
    return {"type": "FeatureCollection", "features": features, "properties": properties}


def results_text(results: Sequence[QueryResult], fmt: str, single: bool = False) -> str:
    """The text of a batch in a text format: jsonl, csv, json or geojson."""
    if fmt == "jsonl":
        return "".join(json_text(row) + "\n" for row in result_rows(results))
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in result_rows(results):  # labels joined: a CSV cell holds no list
            writer.writerow({**row, "labels": "; ".join(row["labels"]), "lat": _blank(row["lat"]), "lon": _blank(row["lon"])})
        return out.getvalue()
    if fmt == "json":
        return json_text(results_json(results, single), indent=2) + "\n"
    if fmt == "geojson":
        return json_text(results_geojson(results), indent=2) + "\n"
    raise ValueError(f"not a text format: {fmt!r} (one of {', '.join(FORMATS)})")


def _blank(value: float | None) -> object:
    return "" if value is None else value


def geoparquet_table(results: Sequence[QueryResult]):
    """A pyarrow Table of the rows plus a WKB point `geometry` (lon, lat; null where there are no
    coordinates), with GeoParquet 1.1 "geo" metadata: no `crs` key, which the spec reads as
    OGC:CRS84 (longitude, latitude on WGS84), as the store's lat/lon are."""
    import pyarrow as pa
    import shapely

    rows = result_rows(results)
    points = [None if r["lat"] is None else shapely.to_wkb(shapely.Point(r["lon"], r["lat"])) for r in rows]
    schema = pa.schema([("query", pa.string()), ("query_modality", pa.string()), ("target", pa.string()), ("rank", pa.int32()),
                        ("patch_id", pa.string()), ("pair_id", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
                        ("split", pa.string()), ("lat", pa.float64()), ("lon", pa.float64()), ("random_init", pa.bool_()),
                        ("geometry", pa.binary())])
    columns = {name: [r[name] for r in rows] for name in COLUMNS}
    table = pa.table({**columns, "geometry": points}, schema=schema)
    located_rows = [r for r in rows if r["lat"] is not None]
    geometry = {"encoding": "WKB", "geometry_types": ["Point"]}
    if located_rows:
        lons, lats = [r["lon"] for r in located_rows], [r["lat"] for r in located_rows]
        geometry["bbox"] = [min(lons), min(lats), max(lons), max(lats)]
    geo = {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": geometry}}
    first = results[0] if results else None
    ours = {"random_init": any(r.random_init for r in results), "provenance": first.to_dict()["provenance"] if first else None}
    return table.replace_schema_metadata({b"geo": json_text(geo).encode(), b"rsretrieve": json_text(ours).encode()})


def write_geoparquet(results: Sequence[QueryResult], where) -> None:
    """GeoParquet to a path or a binary file object."""
    import pyarrow.parquet as pq

    pq.write_table(geoparquet_table(results), where)


def save_results(results: Sequence[QueryResult], path: str | Path, fmt: str | None = None, single: bool = False) -> Path:
    """Write a batch's results to `path`, in `fmt` or the format its suffix names; through a
    temporary file beside it, so a failed write leaves no half file."""
    path = Path(path)
    fmt = fmt or format_for(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        if fmt == "geoparquet":
            write_geoparquet(results, str(tmp))
        else:
            tmp.write_text(results_text(results, fmt, single))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- the HTML map page ------------------------------------------------------------------------------
def map_page_data(results: Sequence[QueryResult], pictures: Sequence[tuple[RawPixels, Sequence[RawPixels]]]) -> dict:
    """The plain data `rsretrieve.export.map_page` draws: per query its footprint and its hits'
    (GeoJSON geometries), thumbnails (PNG bytes: S2 true colour, S1 false colour, as the mosaic
    renders them), scores, labels and ids. `pictures[i]` is (query i's raw patch, its hits' raw
    patches in rank order)."""
    from rsretrieve.export.map_page import png_bytes
    from rsretrieve.export.mosaic import to_rgb

    sections = []
    for result, shapes, (query_pixels, hit_pixels) in zip(results, hit_footprints(results), pictures):
        hits = [{"rank": h.rank, "score": h.score, "patch_id": h.patch_id, "pair_id": h.pair_id, "labels": list(h.labels), "split": h.split,
                 "geometry": geometry_json(shape), "png": png_bytes(to_rgb(pixels, result.target))}
                for h, shape, pixels in zip(result.hits, shapes, hit_pixels)]
        sections.append({"title": result.query_label, "query": result.source or result.query_label, "kind": result.kind,
                         "modality": result.query_modality, "target": result.target, "query_geometry": geometry_json(result.query_footprint),
                         "query_png": png_bytes(to_rgb(query_pixels, result.query_modality)), "hits": hits})
    first = results[0] if results else None
    provenance = first.to_dict()["provenance"] if first else {}
    k = max((len(r.hits) for r in results), default=0)
    what = first.query_label if len(results) == 1 else f"{len(results)} queries"
    return {"title": f"rsretrieve: {what} → {first.target.upper() if first else '?'}, top {k}",
            "random_init": any(r.random_init for r in results), "model": provenance.get("model"),
            "checkpoint": provenance.get("checkpoint_path"), "sections": sections}


def save_map_page(results: Sequence[QueryResult], path: str | Path, pictures: Sequence[tuple[RawPixels, Sequence[RawPixels]]]) -> Path:
    """Write the self-contained HTML map page of `results` (see `map_page_data`) to `path`."""
    from rsretrieve.export.map_page import write_map_page

    return write_map_page(map_page_data(results, pictures), path)


__all__ = ["COLUMNS", "FORMATS", "Hit", "QueryResult", "QueryResults", "QueryStats", "format_for", "geometry_json", "geoparquet_table",
           "hit_footprints", "labels_brief", "map_page_data", "result_rows", "results_geojson", "results_json", "results_text",
           "results_to_dataframe", "save_map_page", "save_results", "short_id", "short_query", "write_geoparquet"]
