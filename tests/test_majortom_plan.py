"""Major TOM runs planned from the collection's metadata.parquet: no image shard opened to plan,
the same patches as the shard-reading (header) path, filters, and what a read does with a tile
that is not the size the metadata planned."""

from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.io
import tifffile

from rsretrieve.datasets import Chunk, open_dataset, patches_fingerprint, sample_root
from rsretrieve.datasets.majortom_plan import TILES_PER_CHUNK
from rsretrieve.errors import DataError, RSRetrieveError

SAMPLE = sample_root() / "majortom"
pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def one_line(error: BaseException, *needles: str) -> str:
    message = str(error)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def header_copy(tmp_path: Path) -> Path:
    """The sample without its metadata.parquet files: read the way it was before planning."""
    shutil.copytree(SAMPLE, tmp_path / "headers", ignore=shutil.ignore_patterns("metadata.parquet"))
    return tmp_path / "headers"


def sample_copy(tmp_path: Path) -> Path:
    shutil.copytree(SAMPLE, tmp_path / "planned")
    return tmp_path / "planned"


def synthetic_collection(folder: Path, n_tiles: int, per_shard: int, shards_present: int | None = None, **columns) -> Path:
    """A Core-S2L2A collection whose metadata.parquet lists `n_tiles` tiles, `per_shard` a shard
    (parquet_url as Major TOM's own: Hugging Face URLs); each grid cell twice in a row (so its second
    tile is `cell.1`). The shards are placeholder files: planning must never open them."""
    images = folder / "Core-S2L2A" / "images"
    images.mkdir(parents=True)
    i = np.arange(n_tiles)
    shard = (i // per_shard).astype(np.int32)
    names = [f"part_{k + 1:05d}.parquet" for k in range(int(shard[-1]) + 1)]
    for name in names[:shards_present]:
        (images / name).write_bytes(b"a placeholder, not a parquet shard")
    cell = i // 2
    row_u, col_r = 500 + cell // 2000, cell % 2000
    text = lambda v: pc.cast(pa.array(v), pa.string())  # noqa: E731
    per_shard_values = lambda values: pa.DictionaryArray.from_arrays(pa.array(shard), pa.array(values))  # noqa: E731
    days = np.datetime64("2020-01-01") + np.arange(len(names)) % 366
    table = {
        "grid_cell": pc.binary_join_element_wise(text(row_u), pc.binary_join_element_wise(text(col_r), "R", ""), "U_"),
        "grid_row_u": pa.array(row_u.astype(np.int32)), "grid_col_r": pa.array(col_r.astype(np.int32)),
        "product_id": per_shard_values([f"S2A_MSIL2A_{str(d).replace('-', '')}T101031_N0500_R022_T33UUP_X{k}" for k, d in enumerate(days)]),
        "timestamp": per_shard_values([f"{str(d).replace('-', '')}T101031" for d in days]),
        "cloud_cover": pa.array(np.zeros(n_tiles)), "nodata": pa.array(np.zeros(n_tiles)),
        "centre_lat": pa.array(45.0 + (row_u - 500) * 0.0898), "centre_lon": pa.array(12.0 + col_r * 0.001),
        "crs": per_shard_values(["EPSG:32633"] * len(names)),
        "parquet_url": per_shard_values([f"https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/{n}" for n in names]),
        "parquet_row": pa.array((i % per_shard).astype(np.int64)),
    }
    pq.write_table(pa.table({**table, **columns}), folder / "Core-S2L2A" / "metadata.parquet")
    return folder


class OpenSpy:
    """Every open of a file, a parquet file or a GeoTIFF, by name and first argument."""

    OPENERS = [(builtins, "open"), (io, "open"), (pq, "ParquetFile"), (pq, "read_table"), (pq, "read_metadata"),
               (pq, "read_schema"), (rasterio, "open"), (rasterio.io, "MemoryFile"), (tifffile, "TiffFile")]

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        for owner, name in self.OPENERS:
            monkeypatch.setattr(owner, name, self._spy(name, getattr(owner, name)))

    def _spy(self, name, real):
        def spy(*args, **kwargs):
            self.calls.append((name, str(args[0]) if args else str(kwargs)))
            return real(*args, **kwargs)

        return spy

    def of_images(self) -> list[tuple[str, str]]:
        return [(n, a) for n, a in self.calls if "images" in a or n in ("MemoryFile", "TiffFile") or n == "open" and a.endswith(".tif")]


def test_a_million_tiles_are_planned_without_opening_an_image(tmp_path, monkeypatch):
    root = synthetic_collection(tmp_path, 1_000_000, 1000)
    ds = open_dataset("majortom", root)
    spy = OpenSpy(monkeypatch)
    chunks = ds.chunks("s2")  # how long it takes: benchmarks/bench_planning.py
    assert spy.of_images() == [], spy.of_images()[:5]
    assert any(name == "ParquetFile" and arg.endswith("metadata.parquet") for name, arg in spy.calls)  # the spy sees reads
    assert len(chunks) == 1_000_000 // TILES_PER_CHUNK and len({c.key for c in chunks}) == len(chunks)
    first, last = chunks[0], chunks[-1]
    assert first.key == "majortom:s2:Core-S2L2A/images/part_00001.parquet:rg0-7" and first.row_groups == tuple(range(8))
    assert first.tiles[:2] == ("S2A_MSIL2A_20200101T101031_N0500_R022_T33UUP_X0/500U_0R", "S2A_MSIL2A_20200101T101031_N0500_R022_T33UUP_X0/500U_0R.1")
    assert last.path == str(root / "Core-S2L2A" / "images" / "part_01000.parquet") and last.row_groups[-1] == 999
    assert first.n_patches == 8 * 100 and sum(c.n_patches for c in chunks) == 100_000_000  # nominal 1068 px: 10 x 10 windows
    # reading is where a shard is opened: the placeholder is named in one line
    batch = ds.read_chunk(first)
    assert len(batch) == 0 and one_line(batch.skipped[0][1], "part_00001.parquet", "unreadable parquet")


def test_the_patch_list_is_made_a_slice_at_a_time_equal_to_the_whole_table(tmp_path):
    ds = open_dataset("majortom", synthetic_collection(tmp_path, 20_000, 1000))
    rows, whole = ds.patch_rows("s2"), ds.metadata("s2", locations=False)
    assert rows.num_rows == whole.num_rows == 2_000_000  # 100 windows a tile
    for offset, length in [(0, 1), (95, 10), (1_234_567, 1000), (1_999_990, 50), (2_000_000, 5)]:
        assert rows.slice(offset, length).equals(whole.slice(offset, length)), (offset, length)


def test_a_hundred_million_windows_are_listed_a_slab_at_a_time(tmp_path):
    ds = open_dataset("majortom", synthetic_collection(tmp_path, 1_000_000, 1000))
    ds.chunks("s2")
    before = pa.total_allocated_bytes()
    rows = ds.patch_rows("s2")
    slab = rows.slice(50_000_000 - 7, 1_000_000)  # from the middle of a tile
    assert rows.num_rows == 100_000_000 and slab.num_rows == 1_000_000
    assert pa.total_allocated_bytes() - before < 400 * 2**20  # one slab (~0.1 GB), never the 100 M rows (~10 GB)
    assert slab.slice(0, 10).equals(rows.slice(50_000_000 - 7, 10))
    # tile 500,000: shard 500's first, cell 250,000 (625U_0R), its first window
    assert slab["patch_id"][7].as_py() == "S2A_MSIL2A_20200514T101031_N0500_R022_T33UUP_X500/625U_0R/0_0"


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_the_sample_planned_from_metadata_gives_the_header_paths_patches(tmp_path, modality):
    planned, headers = open_dataset("majortom", SAMPLE), open_dataset("majortom", header_copy(tmp_path))
    chunks, old = planned.chunks(modality), headers.chunks(modality)
    assert [c.n_patches for c in chunks] == [8, 8, 8] and len(old) == 24 and all(c.row_groups == () for c in old)
    batches, old_batches = [planned.read_chunk(c) for c in chunks], [headers.read_chunk(c) for c in old]
    ids = sum((b.patch_ids for b in batches), [])
    assert ids == sum((b.patch_ids for b in old_batches), []) and len(set(ids)) == 24
    assert not any(b.skipped for b in batches)
    assert pa.concat_tables([b.meta for b in batches]).equals(pa.concat_tables([b.meta for b in old_batches]))
    fine = np.concatenate([b.pixels.fine for b in batches])
    assert fine.shape[0] == 24 and np.array_equal(fine, np.concatenate([b.pixels.fine for b in old_batches]))
    meta, old_meta = planned.metadata(modality), headers.metadata(modality)
    assert meta.schema.equals(old_meta.schema) and meta.column("patch_id").to_pylist() == ids
    pairs = [p for p in meta.column("pair_id").to_pylist() if p.startswith("539U_97R")]  # six tiles of one cell in the shard
    assert pairs == ["539U_97R/0_0"] + [f"539U_97R.{k}/0_0" for k in range(1, 6)]
    for column in meta.column_names:  # lat/lon: projected from the metadata's centre, not the GeoTIFF's transform
        if column in ("lat", "lon"):
            np.testing.assert_allclose(meta[column].to_numpy(), old_meta[column].to_numpy(), rtol=0, atol=1e-9)
        else:
            assert meta[column].equals(old_meta[column]), column
    assert planned.metadata(modality, locations=False)["lat"].null_count == 24
    worker = pickle.loads(pickle.dumps(planned))  # as a Dask worker gets it: no plan, the chunk says what to read
    assert worker.read_chunk(pickle.loads(pickle.dumps(chunks[1]))).patch_ids == batches[1].patch_ids


def test_a_filtered_selection_encodes_and_is_recorded(tmp_path):
    from distributed import Client, LocalCluster

    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
    from rsretrieve.store import EmbeddingStore

    cells = ("539U_97R",)
    expected = pq.read_table(SAMPLE / "Core-S2L2A" / "metadata.parquet").filter(pc.field("grid_cell") == "539U_97R").num_rows
    spec = DatasetSpec("majortom", str(SAMPLE), options=(("cells", cells),))
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        summary = encode(spec, "s2", tmp_path / "cell.zarr", EncoderSpec("csmoe-tiny", "cpu", 8), client=client)
        again = encode(spec, "s2", tmp_path / "cell.zarr", EncoderSpec("csmoe-tiny", "cpu", 8), client=client)
    assert summary.patches_encoded == expected >= 2 and not summary.skipped
    assert again.chunks_already_done == again.chunks_total == 1  # the same selection: the store serves it
    made_from = EmbeddingStore(tmp_path / "cell.zarr").provenance("s2")["dataset"]
    assert made_from["reader"]["filters"] == {"cells": ["539U_97R"]} and made_from["options"]["cells"] == list(cells)
    assert "filters" not in open_dataset("majortom", SAMPLE).describe()  # unfiltered stores keep their provenance


def _rows(modality_dir: str, keep) -> list[str]:
    md = pq.read_table(SAMPLE / modality_dir / "metadata.parquet").to_pylist()
    return sorted(r["source_patch_id"] for r in md if keep(r))


@pytest.mark.parametrize("options, keep", [
    ({"cells": ("539U_97R", "691U_142R")}, lambda r: r["grid_cell"] in ("539U_97R", "691U_142R")),
    ({"bbox": (10.0, 45.0, 16.0, 50.0)}, lambda r: 10 <= r["centre_lon"] <= 16 and 45 <= r["centre_lat"] <= 50),
    ({"dates": ("2017-11-01", "2017-11-01")}, lambda r: r["timestamp"].startswith("20171101")),  # the end day is inclusive
    ({"dates": (None, "2017-06-13")}, lambda r: r["timestamp"].startswith("20170613")),
])
def test_filters_select_what_they_say_on_the_sample(options, keep):
    ds = open_dataset("majortom", SAMPLE, **options)
    meta = ds.metadata("s2")
    expected = _rows("Core-S2L2A", keep)
    assert 0 < len(expected) < 24
    assert sorted(meta.column("source_patch_id").to_pylist()) == expected
    assert sum(c.n_patches for c in ds.chunks("s2")) == meta.num_rows
    assert sum((ds.read_chunk(c).patch_ids for c in ds.chunks("s2")), []) == meta.column("patch_id").to_pylist()
    whole = open_dataset("majortom", SAMPLE).metadata("s2")
    assert set(meta.column("patch_id").to_pylist()) <= set(whole.column("patch_id").to_pylist())  # same ids as unfiltered
    assert ds.describe()["filters"] == {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def test_max_nodata_and_tiles_of_absent_shards(tmp_path):
    nodata = pa.array([0.0, 0.05, 0.5, None, 0.1, 0.2, 1.0, 0.0] * 4)
    root = synthetic_collection(tmp_path, 32, 8, shards_present=3, nodata=nodata, tile_px=pa.array([120] * 32, pa.int32()))
    ds = open_dataset("majortom", root, max_nodata=0.1)
    chunks = ds.chunks("s2")
    assert [c.row_groups for c in chunks] == [(0, 1, 4, 7)] * 3  # 0, 0.05, 0.1, 0.0; unknown (null) is not kept
    assert [Path(c.path).name for c in chunks] == ["part_00001.parquet", "part_00002.parquet", "part_00003.parquet"]
    assert one_line(ds.count_message(), "metadata.parquet", "4 selected tile(s)", "1 shard(s) not found")
    assert open_dataset("majortom", root).count_message() is None  # nothing planned yet, nothing to say


def test_a_filter_that_selects_nothing_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        open_dataset("majortom", SAMPLE, cells=("1U_1R",)).chunks("s2")
    one_line(e.value, "Core-S2L2A/metadata.parquet", "no tile left after the filter cells=['1U_1R']")
    with pytest.raises(DataError) as e:
        open_dataset("majortom", SAMPLE, cells=("539U_97R",), dates=("2018-01-01", "2018-12-31")).metadata("s1")
    one_line(e.value, "Core-S1RTC/metadata.parquet", "dates=['2018-01-01', '2018-12-31']", "after cells=['539U_97R']")
    with pytest.raises(DataError) as e:
        open_dataset("majortom", header_copy(tmp_path), cells=("539U_97R",)).chunks("s2")
    one_line(e.value, "need Core-S2L2A's metadata.parquet")


@pytest.mark.parametrize("options, needle", [
    ({"bbox": (1, 2, 3)}, "bbox: expected"), ({"dates": ("2020-13-01", None)}, "not an ISO date"),
    ({"dates": ("2020-02-01", "2020-01-01")}, "before the start"), ({"cells": ("Naples",)}, "not a Major TOM grid cell"),
    ({"max_nodata": 2}, "between 0 and 1"),
])
def test_malformed_filters_are_refused_when_opening(options, needle):
    with pytest.raises(RSRetrieveError, match=needle):
        open_dataset("majortom", SAMPLE, **options)


def test_corrupt_or_incomplete_metadata_is_one_line_naming_it(tmp_path):
    root = sample_copy(tmp_path)
    md = root / "Core-S2L2A" / "metadata.parquet"
    data = md.read_bytes()
    md.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        open_dataset("majortom", root).chunks("s2")
    one_line(e.value, str(md), "unreadable parquet")
    pq.write_table(pq.read_table(SAMPLE / "Core-S2L2A" / "metadata.parquet").drop_columns(["parquet_row"]), md)
    with pytest.raises(DataError) as e:
        open_dataset("majortom", root).metadata("s2")
    one_line(e.value, str(md), "missing column(s) 'parquet_row'")
    assert len(open_dataset("majortom", root).chunks("s1")) == 3  # the other collection is unaffected


def test_a_duplicated_metadata_row_is_refused_before_encoding_naming_it(tmp_path):
    """Issue 23: duplicate ids in a dataset's metadata are refused before encoding (one line)."""
    root = sample_copy(tmp_path)
    md = root / "Core-S2L2A" / "metadata.parquet"
    table = pq.read_table(md)
    pq.write_table(pa.concat_tables([table, table.slice(1, 1)]), md)
    with pytest.raises(DataError) as e:
        open_dataset("majortom", root).chunks("s2")
    one_line(e.value, str(md), f"row {table['parquet_row'][1].as_py()} of", "is listed twice")


def test_a_tile_smaller_than_planned_names_the_windows_it_lacks(tmp_path):
    root = sample_copy(tmp_path)
    md_path = root / "Core-S2L2A" / "metadata.parquet"
    md = pq.read_table(md_path)
    sizes = [240 if row == 3 else 120 for row in md.column("parquet_row").to_pylist()]
    pq.write_table(md.set_column(md.column_names.index("tile_px"), "tile_px", pa.array(sizes, pa.int32())), md_path)
    ds = open_dataset("majortom", root)
    chunk = ds.chunks("s2")[0]
    assert chunk.row_groups == (0, 1, 2) and chunk.tile_size == 120  # chunks never mix planned sizes
    planned = next(c for c in ds.chunks("s2") if 3 in c.row_groups)
    assert planned.row_groups == (3,) and planned.n_patches == 4  # 240 px: 2 x 2 windows
    batch = ds.read_chunk(planned)
    assert len(batch) == 1 and batch.patch_ids[0].endswith("/0_0")
    shard = root / "Core-S2L2A" / "images" / "part_00001.parquet"
    assert sorted(pid.rsplit("/", 1)[1] for pid, _ in batch.skipped) == ["0_120", "120_0", "120_120"]
    for _, reason in batch.skipped:
        assert one_line(reason, f"{shard}:row 3", "tile is 120x120 px, metadata planned 240x240") == \
            f"{shard}:row 3: tile is 120x120 px, metadata planned 240x240"
    assert ds.metadata("s2").num_rows == sum(c.n_patches for c in ds.chunks("s2")) == 23 + 4


def test_a_tile_larger_than_planned_yields_only_the_planned_windows(tmp_path):
    from rasterio.warp import transform
    from test_readers import write_synthetic_tiles

    write_synthetic_tiles(tmp_path)  # one 1068 px tile per collection, top-left (400000, 4520000) in EPSG:32633
    lon, lat = transform("EPSG:32633", "EPSG:4326", [405340.0], [4514660.0])  # its centre
    columns = {"grid_cell": ["454U_120R"], "product_id": ["P"], "timestamp": ["2020-07-01 10:00:00"], "nodata": [0.0],
               "centre_lat": lat, "centre_lon": lon, "crs": ["EPSG:32633"], "parquet_url": ["images/part_00001.parquet"],
               "parquet_row": [0]}
    for collection in ("Core-S2L2A", "Core-S1RTC"):
        pq.write_table(pa.table(columns), tmp_path / collection / "metadata.parquet")
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-h", ignore=shutil.ignore_patterns("metadata.parquet"))
    nominal, headers = open_dataset("majortom", tmp_path), open_dataset("majortom", tmp_path.parent / f"{tmp_path.name}-h")
    meta, old = nominal.metadata("s2"), headers.metadata("s2")  # the nominal 1068 px: the same 100 windows
    assert meta.column("patch_id").to_pylist() == old.column("patch_id").to_pylist() and meta.num_rows == 100
    np.testing.assert_allclose(meta["lat"].to_numpy(), old["lat"].to_numpy(), rtol=0, atol=1e-7)  # window centres, 10 m a pixel
    np.testing.assert_allclose(meta["lon"].to_numpy(), old["lon"].to_numpy(), rtol=0, atol=1e-7)
    small = open_dataset("majortom", tmp_path, tile_size=240, windows="grid")  # the user's tile_size wins over the nominal size
    batch = small.read_chunk(small.chunks("s2")[0])  # of the 1068 px tile's 64 windows, the 4 planned
    assert batch.patch_ids == ["P/454U_120R/0_0", "P/454U_120R/0_120", "P/454U_120R/120_0", "P/454U_120R/120_120"]
    assert not batch.skipped


def test_a_shard_that_disagrees_with_the_metadata_yields_no_patch_under_a_wrong_id(tmp_path):
    root = sample_copy(tmp_path)
    md_path = root / "Core-S1RTC" / "metadata.parquet"
    md = pq.read_table(md_path)
    cells = md.column("grid_cell").to_pylist()
    cells[0] = "1U_1R"
    pq.write_table(md.set_column(0, "grid_cell", pa.array(cells)), md_path)
    ds = open_dataset("majortom", root)
    batch = ds.read_chunk(ds.chunks("s1")[0])
    assert len(batch) == 7 and batch.skipped[0][0].endswith("/1U_1R")
    one_line(batch.skipped[0][1], "part_00001.parquet:row 0", "metadata.parquet planned")


def test_the_fingerprint_of_one_tile_chunks_is_unchanged_and_planned_chunks_name_their_tiles():
    old = Chunk("majortom", "k", "s2", "majortom", "/r/part_1.parquet", (), 3, 64)
    digest = hashlib.sha256("\x1f".join(("part_1.parquet", "3", "64")).encode() + b"\x1e").hexdigest()
    assert patches_fingerprint([old]) == digest
    a = Chunk("majortom", "k", "s2", "majortom", "/r/part_1.parquet", (), 3, 200, row_groups=(3, 4), tiles=("P/1U_1R", "P/1U_2R"), tile_size=1068)
    b = Chunk("majortom", "k", "s2", "majortom", "/r/part_1.parquet", (), 3, 200, row_groups=(3, 4), tiles=("P/1U_1R", "P/1U_3R"), tile_size=1068)
    assert len({patches_fingerprint([old]), patches_fingerprint([a]), patches_fingerprint([b])}) == 3


def test_the_filters_from_the_command_line_make_a_store_of_their_own(tmp_path):
    import xarray as xr

    from test_cli import assert_clean_error, run

    root = Path(__file__).resolve().parents[1] / "rsretrieve" / "data" / "sample" / "majortom"
    common = ["index", "--dataset", "majortom", "--data-root", root, "--model", "csmoe-tiny", "--modality", "s2"]
    run([*common, "--cells", "539U_97R", "--dates", "2017-06-01..2017-06-30"], tmp_path)
    stores = sorted((tmp_path / "stores").glob("*.zarr"))
    assert [s.name.split("--")[1].rsplit("-", 1)[0] for s in stores] == ["csmoe-tiny-cells-dates"]
    cells = set(xr.open_zarr(stores[0], group="s2")["grid_cell"].values.tolist())
    assert cells == {"539U_97R"}
    assert_clean_error(run([*common, "--bbox", "1,2,3"], tmp_path, check=False), "bbox")
    assert_clean_error(run([*common, "--cells", "999U_1R"], tmp_path, check=False), "no tile left", "999U_1R")
    assert_clean_error(run(["index", "--dataset", "sample", "--model", "csmoe-tiny", "--cells", "539U_97R"], tmp_path, check=False), "--cells", "majortom only")
