#!/usr/bin/env python
"""Build the bundled real sample `rsretrieve/data/sample/` from the BigEarthNet-v2 mock data that
ships inside the `configilm==0.7.1` wheel (24 real S1-S2 patch pairs, rico-hdl LMDB encoding).

Writes, deterministically (re-running overwrites the whole sample directory):
  BigEarthNet-S2/<S2 product>/<patch_id>/<patch_id>_<band>.tif   12 bands, native size, uint16
  BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_{VV,VH}.tif   float32 dB, 120 px
    (the release layout: the S2 product is the patch_id minus `_<row>_<col>`, the S1 product the
    s1_name minus `_<tile>_<row>_<col>`, as the release, TorchGeo and rico-hdl have it)
  metadata.parquet, metadata_for_patches_with_snow_cloud_or_shadow.parquet   (copied unchanged)
  majortom/Core-S2L2A/images/part_00001.parquet + majortom/Core-S2L2A/metadata.parquet
  majortom/Core-S1RTC/images/part_00001.parquet + majortom/Core-S1RTC/metadata.parquet
  SOURCE.md

`--metadata-only` rewrites just the two Major TOM metadata.parquet files of an existing sample
(their `tile_px` column, read from the shards), leaving every other file as it is.

Usage:
  python tools/make_sample.py --source /path/to/configilm/extra/mock_data/BENv2
  python tools/make_sample.py --wheel configilm-0.7.1-py3-none-any.whl
  python tools/make_sample.py            # pip download --no-deps configilm==0.7.1 into a temp dir
  python tools/make_sample.py --metadata-only
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rsretrieve import geo  # noqa: E402

WHEEL_DIR = "configilm/extra/mock_data/BENv2"
LMDB_NAME = "BigEarthNet-V2-LMDB"
META = "metadata.parquet"
META_SNOW = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
DEFAULT_OUT = ROOT / "rsretrieve" / "data" / "sample"

S2_ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
S2_RES = {"B01": 60, "B09": 60, "B02": 10, "B03": 10, "B04": 10, "B08": 10}  # others 20 m
S1_BANDS = ("VV", "VH")
PATCH = 120
PATCH_M = 1200.0  # 120 px at 10 m
S1_NODATA = -32768.0
MAJORTOM_FIRST_BAND = {"Core-S2L2A": "B02", "Core-S1RTC": "vv"}  # a 10 m band: its side is the tile's

_NAME_RC = re.compile(r"^(?P<product>.+)_(?P<row>\d+)_(?P<col>\d+)$")
_TILE = re.compile(r"_T?(\d{2}[C-X][A-Z]{2})(?:_|$)")
_DATE = re.compile(r"_(\d{8}T\d{6})_")


def split_name(name: str) -> tuple[str, int, int]:
    m = _NAME_RC.match(name)
    if not m:
        raise ValueError(f"patch name without trailing _<row>_<col>: {name}")
    return m.group("product"), int(m.group("row")), int(m.group("col"))


def tile_of(name: str) -> str:
    m = _TILE.search(name)
    if not m:
        raise ValueError(f"no MGRS tile in {name}")
    return m.group(1)


def datetime_of(name: str) -> str:
    m = _DATE.search(name + "_")
    if not m:
        raise ValueError(f"no acquisition time in {name}")
    return m.group(1)


def band_res(band: str) -> int:
    return S2_RES.get(band, 20)


# --------------------------------------------------------------------------------------------
# source


def locate_source(args, tmp: Path) -> Path:
    if args.source:
        src = Path(args.source)
    else:
        wheel = Path(args.wheel) if args.wheel else None
        if wheel is None:
            print("downloading configilm==0.7.1 (no deps) ...", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), "configilm==0.7.1"],
                check=True,
            )
            wheel = next(tmp.glob("configilm-0.7.1-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith(WHEEL_DIR + "/")]
            if not members:
                raise SystemExit(f"{wheel}: no {WHEEL_DIR}/ inside")
            zf.extractall(tmp / "wheel", members)
        src = tmp / "wheel" / WHEEL_DIR
    for need in (LMDB_NAME, META, META_SNOW):
        if not (src / need).exists():
            raise SystemExit(f"{src}: missing {need}")
    return src


def read_lmdb(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import lmdb
    from safetensors.numpy import load

    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    try:
        with env.begin() as txn:
            return {k.decode(): load(bytes(v)) for k, v in txn.cursor()}
    finally:
        env.close()


# --------------------------------------------------------------------------------------------
# writing


def _gtiff_profile(arr: np.ndarray, transform, crs: str, nodata=None) -> dict:
    predictor = 3 if arr.dtype.kind == "f" else 2
    profile = dict(
        driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1, dtype=arr.dtype.name,
        crs=crs, transform=transform, compress="deflate", predictor=predictor, zlevel=9,
    )
    if nodata is not None:
        profile["nodata"] = nodata
    return profile


def write_tif(path: Path, arr: np.ndarray, transform, crs: str, nodata=None) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **_gtiff_profile(arr, transform, crs, nodata)) as ds:
        ds.write(arr, 1)


def tif_bytes(arr: np.ndarray, transform, crs: str, nodata=None) -> bytes:
    from rasterio.io import MemoryFile

    with MemoryFile() as mf:
        with mf.open(**_gtiff_profile(arr, transform, crs, nodata)) as ds:
            ds.write(arr, 1)
        return bytes(mf.read())


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # a small 60 px preview (every second pixel) keeps the bundled sample small
    Image.fromarray(np.ascontiguousarray(rgb[::2, ::2])).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def s2_thumbnail(bands: dict[str, np.ndarray]) -> bytes:
    rgb = np.stack([bands["B04"], bands["B03"], bands["B02"]], axis=-1).astype(np.float32)
    return png_bytes(np.clip(rgb / 2000.0 * 255.0, 0, 255).astype(np.uint8))


def s1_thumbnail(bands_db: dict[str, np.ndarray]) -> bytes:
    vv, vh = bands_db["VV"], bands_db["VH"]
    def scale(x, lo, hi):
        return np.clip((x - lo) / (hi - lo) * 255.0, 0, 255)
    rgb = np.stack([scale(vv, -25, 0), scale(vh, -30, -5), scale(vv - vh, 0, 15)], axis=-1)
    return png_bytes(rgb.astype(np.uint8))


def patch_geometry(s2_name: str):
    """(crs, top-left x, top-left y) of a BigEarthNet patch, reconstructed from its tile and row/col.

    The S2 tile's upper-left corner is taken as the MGRS 100 km square's north-west corner; patch
    (row, col) starts row*1200 m south and col*1200 m east of it. Approximate, not the real one."""
    tile = tile_of(s2_name)
    zone, easting, northing = geo.mgrs_square_origin(tile)
    _, row, col = split_name(s2_name)
    return f"EPSG:{geo.utm_epsg(zone)}", easting + col * PATCH_M, northing + 100_000.0 - row * PATCH_M


def build(src: Path, out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rasterio.transform import from_origin

    meta = pq.read_table(src / META)
    snow = pq.read_table(src / META_SNOW)
    rows = meta.to_pylist() + snow.to_pylist()
    rows.sort(key=lambda r: r["patch_id"])
    lmdb_data = read_lmdb(src / LMDB_NAME)
    keys = set(lmdb_data)
    pairs = [r for r in rows if r["patch_id"] in keys and r["s1_name"] in keys]
    missing = [r["patch_id"] for r in rows if r not in pairs]
    unlisted = sorted(keys - {r["patch_id"] for r in rows} - {r["s1_name"] for r in rows})

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copyfile(src / META, out / META)
    shutil.copyfile(src / META_SNOW, out / META_SNOW)

    s2_rows, s1_rows = [], []
    for r in pairs:
        pid, s1n = r["patch_id"], r["s1_name"]
        crs, x0, y0 = patch_geometry(pid)
        s2_product = split_name(pid)[0]
        s1_product = split_name(s1n)[0].rpartition("_")[0]  # minus the MGRS tile too
        s2 = lmdb_data[pid]
        s1 = lmdb_data[s1n]
        if set(s2) != set(S2_ALL_BANDS) or set(s1) != set(S1_BANDS):
            raise SystemExit(f"{pid}: unexpected bands {sorted(s2)} / {sorted(s1)}")
        # --- release tree
        for band in S2_ALL_BANDS:
            arr = np.ascontiguousarray(s2[band])
            res = band_res(band)
            assert arr.shape == (PATCH * 10 // res,) * 2 and arr.dtype == np.uint16, (pid, band, arr.shape)
            write_tif(out / "BigEarthNet-S2" / s2_product / pid / f"{pid}_{band}.tif", arr,
                      from_origin(x0, y0, res, res), crs)
        for band in S1_BANDS:
            arr = np.ascontiguousarray(s1[band])
            assert arr.shape == (PATCH, PATCH) and arr.dtype == np.float32, (s1n, band)
            write_tif(out / "BigEarthNet-S1" / s1_product / s1n / f"{s1n}_{band}.tif", arr,
                      from_origin(x0, y0, 10, 10), crs)
        # --- Major TOM rows
        cx, cy = x0 + PATCH_M / 2, y0 - PATCH_M / 2
        lat, lon = (float(v[0]) for v in geo.to_wgs84(crs, [cx], [cy]))
        cell = geo.grid_cell(lat, lon)
        grow, gcol = geo.grid_indices(lat, lon)
        common = dict(grid_cell=cell, grid_row_u=grow, grid_col_r=gcol, centre_lat=lat, centre_lon=lon, crs=crs)
        s2_row = dict(product_id=s2_product, product_datetime=datetime_of(pid), source_patch_id=pid,
                      thumbnail=s2_thumbnail(s2), **common)
        for band in S2_ALL_BANDS:
            res = band_res(band)
            s2_row[band] = tif_bytes(np.ascontiguousarray(s2[band]), from_origin(x0, y0, res, res), crs)
        # no cloud mask is available for BigEarthNet patches: an all-zero (clear) 10 m mask
        s2_row["cloud_mask"] = tif_bytes(np.zeros((PATCH, PATCH), np.uint8), from_origin(x0, y0, 10, 10), crs)
        s2_rows.append(s2_row)
        s1_row = dict(product_id=s1_product, product_datetime=datetime_of(s1n), source_patch_id=s1n,
                      thumbnail=s1_thumbnail(s1), **common)
        for band in S1_BANDS:
            linear = np.power(10.0, s1[band].astype(np.float64) / 10.0).astype(np.float32)
            linear[~np.isfinite(s1[band])] = S1_NODATA
            s1_row[band.lower()] = tif_bytes(linear, from_origin(x0, y0, 10, 10), crs, nodata=S1_NODATA)
        s1_rows.append(s1_row)

    def write_majortom(name: str, rows_: list[dict], band_cols: list[str]) -> None:
        base = out / "majortom" / name
        (base / "images").mkdir(parents=True)
        shard = base / "images" / "part_00001.parquet"
        cols = ["product_id", "grid_cell", "product_datetime", "thumbnail", *band_cols, "source_patch_id"]
        types = {c: pa.binary() for c in ["thumbnail", *band_cols]}
        schema = pa.schema([(c, types.get(c, pa.string())) for c in cols])
        with pq.ParquetWriter(shard, schema, compression="none", write_statistics=False) as w:
            for row in rows_:  # one row per row group, as the real Core release
                w.write_table(pa.Table.from_pylist([{c: row[c] for c in cols}], schema=schema), row_group_size=1)
        md = pa.table({
            "grid_cell": pa.array([r["grid_cell"] for r in rows_], pa.string()),
            "grid_row_u": pa.array([r["grid_row_u"] for r in rows_], pa.int32()),
            "grid_col_r": pa.array([r["grid_col_r"] for r in rows_], pa.int32()),
            "product_id": pa.array([r["product_id"] for r in rows_], pa.string()),
            "timestamp": pa.array([r["product_datetime"] for r in rows_], pa.string()),
            "cloud_cover": pa.array([None] * len(rows_), pa.float64()),
            "nodata": pa.array([0.0] * len(rows_), pa.float64()),
            "centre_lat": pa.array([r["centre_lat"] for r in rows_], pa.float64()),
            "centre_lon": pa.array([r["centre_lon"] for r in rows_], pa.float64()),
            "crs": pa.array([r["crs"] for r in rows_], pa.string()),
            "parquet_url": pa.array(["images/part_00001.parquet"] * len(rows_), pa.string()),
            "parquet_row": pa.array(list(range(len(rows_))), pa.int64()),
            "source_patch_id": pa.array([r["source_patch_id"] for r in rows_], pa.string()),
        })
        pq.write_table(md, base / "metadata.parquet", compression="zstd")
        write_tile_px(base)

    write_majortom("Core-S2L2A", s2_rows, [*S2_ALL_BANDS, "cloud_mask"])
    write_majortom("Core-S1RTC", s1_rows, ["vv", "vh"])
    return dict(pairs=pairs, missing=missing, unlisted=unlisted, n_meta=meta.num_rows, n_snow=snow.num_rows,
                cells=sorted({r["grid_cell"] for r in s2_rows}))


def tile_sizes(shard: Path, band: str) -> list[int]:
    """The side in pixels of each tile of a shard (row order), from the GeoTIFF header of its band cell."""
    import pyarrow.parquet as pq
    from rasterio.io import MemoryFile

    sizes = []
    for i, cell in enumerate(pq.read_table(shard, columns=[band]).column(band).to_pylist()):
        with MemoryFile(cell) as mf, mf.open() as ds:
            if ds.height != ds.width:
                raise SystemExit(f"{shard}: row {i} is {ds.height}x{ds.width} px, not square")
            sizes.append(ds.height)
    return sizes


def write_tile_px(collection: Path) -> None:
    """Add (or renew) the `tile_px` column of a collection's metadata.parquet: each tile's real side,
    so that a run planned from the metadata alone counts the sample's windows right (its tiles are
    120 px BigEarthNet patches, not Major TOM's nominal 1068 px)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    md = pq.read_table(collection / META)
    sizes = tile_sizes(collection / "images" / "part_00001.parquet", MAJORTOM_FIRST_BAND[collection.name])
    column = pa.array([sizes[r] for r in md.column("parquet_row").to_pylist()], pa.int32())
    if "tile_px" in md.column_names:
        md = md.drop_columns(["tile_px"])
    md = md.add_column(md.column_names.index("parquet_row") + 1, "tile_px", column)
    pq.write_table(md, collection / META, compression="zstd")


SOURCE_MD = """# Bundled sample: provenance

Generated by `tools/make_sample.py` (deterministic; re-run it to rebuild this folder).

## Source

- Python wheel `configilm==0.7.1` (PyPI), folder `{wheel_dir}/` inside it: the mock data of
  configilm's BigEarthNet-v2 utilities. It holds **real BigEarthNet-v2 (reBEN) patches** in the
  rico-hdl LMDB encoding (`{lmdb}/`: key = patch folder name, value = safetensors dict
  band name -> 2-D array; S2 uint16 at native size, S1 float32 backscatter in dB), plus
  `{meta}` and `{snow}`.
- {n_pairs} S1-S2 pairs ({n_keys} LMDB entries), Sentinel-2 tiles 33UUP (Austria, 2017-06-13) and
  35VNJ (Finland, 2017-11-01). `{meta}` lists {n_meta} of them (splits: {splits});
  the other {n_snow} are only in `{snow}` ({snow_desc}).

## What is here and how it was made

- `BigEarthNet-S2/<S2 product>/<patch_id>/<patch_id>_<band>.tif`: the 12 bands (B01..B12, B8A)
  at native resolution (10 m bands 120 px, 20 m bands 60 px, B01/B09 20 px), uint16, pixels
  unchanged from the LMDB. `BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_{{VV,VH}}.tif`:
  float32 dB, 120 px, unchanged. The release layout: the S2 product folder is the patch_id
  without its trailing `_<row>_<col>`, the S1 product folder the s1_name without
  `_<tile>_<row>_<col>` (as the release, the bigearthnet-pipeline, TorchGeo and rico-hdl have it).
  GeoTIFFs are deflate-compressed (with a predictor).
- `{meta}` and `{snow}`: copied byte for byte.
- **Georeference: an approximate reconstruction**, not the original. The LMDB carries no
  georeference. Each patch is given the UTM CRS of its tile (33UUP -> EPSG:32633,
  35VNJ -> EPSG:32635) and a top-left corner at (E0 + col*1200 m, N0 + 100 km - row*1200 m), where
  (E0, N0) is the south-west corner of the MGRS 100 km square (33UUP: 300000 E, 5300000 N;
  35VNJ: 500000 E, 6800000 N) and row/col come from the patch name. Transforms are at 10/20/60 m.
  The S1 patch gets the same footprint as its S2 pair. Positions are plausible (the right
  100 km square) but can be off by kilometres; do not use them as ground truth.
- `majortom/Core-S2L2A/images/part_00001.parquet` and `majortom/Core-S1RTC/images/part_00001.parquet`:
  the same pixels in the Major TOM Core format, one row per row group, one 120 px tile per
  BigEarthNet patch (real Core tiles are 1068 px grid cells). Columns as the real release:
  `product_id, grid_cell, product_datetime, thumbnail` (PNG bytes), S2 `B01..B12, B8A, cloud_mask`
  (each cell the bytes of a single-band GeoTIFF at native resolution) and S1 `vv, vh` (linear
  power float32 = 10**(dB/10), GeoTIFF nodata -32768). **Additions**: column `source_patch_id`
  (the BigEarthNet S2 patch_id or S1 s1_name of the row) in the shards and in each
  `metadata.parquet`. `cloud_mask` is all zeros (BigEarthNet ships no per-pixel cloud mask).
  `grid_cell` is computed with the Major TOM grid (`rsretrieve.geo.grid_cell`, equal to Major TOM's `Grid(10)`) from
  the reconstructed patch centre; several patches fall in the same 10 km cell ({cells}).
- `majortom/<collection>/metadata.parquet`: `grid_cell, grid_row_u, grid_col_r, product_id,
  timestamp, cloud_cover, nodata, centre_lat, centre_lon, crs, parquet_url, parquet_row` (+
  `tile_px`, each tile's side in pixels read from its shard, and `source_patch_id`). `parquet_url`
  is relative to the collection folder; `cloud_cover` is null (unknown); `nodata` is 0.0 (no
  invalid pixels).

## Licence and citation

BigEarthNet is distributed under the Community Data License Agreement - Permissive, Version 1.0
(CDLA-Permissive-1.0). Contains modified Copernicus Sentinel data (2017). Cite:

- K. N. Clasen, L. Hackel, T. Burgert, G. Sumbul, B. Demir, V. Markl, "reBEN: Refined BigEarthNet
  Dataset for Remote Sensing Image Analysis", IEEE International Geoscience and Remote Sensing
  Symposium (IGARSS), 2025.
- G. Sumbul, A. de Wall, T. Kreuziger, F. Marcelino, H. Costa, P. Benevides, M. Caetano, B. Demir,
  V. Markl, "BigEarthNet-MM: A Large Scale Multi-Modal Multi-Label Benchmark Archive for Remote
  Sensing Image Classification and Retrieval", IEEE Geoscience and Remote Sensing Magazine, 9(3),
  174-180, 2021.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--wheel", help="path to configilm-0.7.1-py3-none-any.whl")
    g.add_argument("--source", help=f"path to the unpacked {WHEEL_DIR} folder")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (replaced)")
    ap.add_argument("--metadata-only", action="store_true", help="rewrite only the Major TOM metadata.parquet files of --out")
    args = ap.parse_args(argv)
    if args.metadata_only:
        for collection in MAJORTOM_FIRST_BAND:
            write_tile_px(Path(args.out) / "majortom" / collection)
            print(f"wrote {Path(args.out) / 'majortom' / collection / META}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        src = locate_source(args, Path(tmp))
        info = build(src, Path(args.out))
    pairs = info["pairs"]
    from collections import Counter

    import pyarrow.parquet as pq

    meta_ids = set(pq.read_table(Path(args.out) / META).column("patch_id").to_pylist())
    splits = Counter(r["split"] for r in pairs if r["patch_id"] in meta_ids)
    snow_rows = [r for r in pairs if r["patch_id"] not in meta_ids]
    snow_desc = ", ".join(
        f"{r['country']} {r['split']} {'snow' if r['contains_seasonal_snow'] else ''}"
        f"{'cloud/shadow' if r['contains_cloud_or_shadow'] else ''}".strip()
        for r in snow_rows
    )
    text = SOURCE_MD.format(
        wheel_dir=WHEEL_DIR, lmdb=LMDB_NAME, meta=META, snow=META_SNOW, n_pairs=len(pairs),
        n_keys=2 * len(pairs) + len(info["unlisted"]), n_meta=info["n_meta"], n_snow=info["n_snow"],
        splits=", ".join(f"{k} {v}" for k, v in sorted(splits.items())), snow_desc=snow_desc,
        cells=", ".join(info["cells"]),
    )
    (Path(args.out) / "SOURCE.md").write_text(text)
    print(f"wrote {len(pairs)} pairs to {args.out}"
          + (f"; skipped (not in LMDB): {info['missing']}" if info["missing"] else "")
          + (f"; LMDB keys not in metadata: {info['unlisted']}" if info["unlisted"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
