"""Untrusted input cannot hang or exhaust (issue 23): symlink loops, huge declared rasters, absurd
values, checkpoints whose config lies about their tensors, duplicate ids."""

import glob
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from rsretrieve.errors import RSRetrieveError

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def deadline(seconds: float, call):
    """call() in a daemon thread: its result, or a failure when it has not returned in `seconds`
    (the thread is left behind: the suite goes on)."""
    out = {}

    def target():
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_recursive_pattern_over_a_symlink_loop_ends_with_each_tile_once(tmp_path, monkeypatch):
    from rsretrieve.retrieval.inputs import expand_pattern, expand_tile_arg

    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/one.tif", "a/b/two.tif", "a/b/notes.txt", "top.tif"):
        (tmp_path / name).write_bytes(b"")
    tree = sorted(glob.glob(f"{tmp_path}/**/*.tif", recursive=True))  # before the loops: the reference
    os.symlink("..", tmp_path / "a" / "b" / "up")  # two loops: glob walked 2**40 paths
    os.symlink(".", tmp_path / "a" / "self")
    tiles, batch = deadline(60, lambda: expand_tile_arg(f"{tmp_path}/**/*.tif"))
    assert batch and [str(t) for t in tiles] == tree == [f"{tmp_path}/a/b/two.tif", f"{tmp_path}/a/one.tif", f"{tmp_path}/top.tif"]
    monkeypatch.chdir(tmp_path)
    assert deadline(60, lambda: expand_pattern("a/**/*.tif")) == ["a/b/two.tif", "a/one.tif"]
    assert expand_pattern("a/*/*.tif") == sorted(glob.glob("a/*/*.tif"))  # one level: glob's own answer, links included
    with pytest.raises(RSRetrieveError, match=r"/\*\*/\*\.png: no file or folder matches this pattern$"):
        deadline(60, lambda: expand_tile_arg(f"{tmp_path}/**/*.png"))


# -- tiles that declare or hold what no sensor makes ------------------------------------------------
HUGE = 200_000


def write_tile(path: Path, values, *, count=10, dtype="float32", width=240, height=240, huge=False) -> Path:
    """A georeferenced tile; `huge`: 200,000 x 200,000 px declared, tiled, compressed and sparse (a
    megabyte on disk)."""
    import rasterio
    from rasterio.transform import from_origin

    if huge:
        width = height = HUGE
    profile = dict(driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs="EPSG:32632",
                   transform=from_origin(300000, 5000000, 10, 10), tiled=True, blockxsize=512, blockysize=512,
                   compress="deflate", sparse_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        h, w = min(height, 512), min(width, 512)
        ds.write(np.full((count, h, w), values, dtype), window=rasterio.windows.Window(0, 0, w, h))
    return path


def bounded_probe(module: str, function: str, limit_gib: int) -> str:
    """A script calling `module.function(argv[1])` in a process limited to `limit_gib` of address
    space (what the old code allocated fails there, not on the machine); it prints the outcome,
    then the growth of its peak RSS in MB and the seconds it took."""
    return f"""
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({limit_gib} << 30, {limit_gib} << 30))
from {module} import {function}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    {function}(sys.argv[1])
    print("done")
except Exception as exc:
    print(type(exc).__name__ + ": " + str(exc))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, round(time.monotonic() - start, 2))
"""


MEMORY_PROBE = bounded_probe("rsretrieve.datasets.tile", "read_tile", 3)  # the old reader's 5.5 GB fails at 3 GiB


def test_a_tile_declaring_200000_px_a_side_is_refused_from_its_header(tmp_path):
    tile = write_tile(tmp_path / "huge.tif", 1000, count=12, dtype="uint16", huge=True)
    assert tile.stat().st_size < 4 << 20
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tile)], capture_output=True, text=True, timeout=300)
    message, figures = proc.stdout.strip().splitlines()
    growth_mb, seconds = figures.split()
    assert message == (f"DataError: {tile}: declares 200,000 x 200,000 px x 12 bands uint16 = 960.0 GB; more than the limit "
                       "of 268,435,456 px (raise it with --max-tile-pixels or $RSRETRIEVE_MAX_TILE_PIXELS)"), proc.stdout + proc.stderr
    assert int(growth_mb) < 200, figures  # the old reader grew by 2.7 GB before a MemoryError
    print(f"\n200,000 px tile: refused after {seconds} s, peak RSS growth {growth_mb} MB")


def test_the_size_cap_is_read_from_the_environment_and_counts_each_side(tmp_path, monkeypatch):
    from rsretrieve.datasets.tile import open_tile
    from rsretrieve.errors import DataError

    tile = write_tile(tmp_path / "wide.tif", 1000, dtype="uint16", width=2000, height=120)
    assert open_tile(tile).n_patches == 16
    monkeypatch.setenv("RSRETRIEVE_MAX_TILE_PIXELS", "40000")
    with pytest.raises(DataError, match=r"wide\.tif: declares 2,000 x 120 px x 10 bands uint16 = 4\.8 MB; more than the limit of 40,000 px \(raise"):
        open_tile(tile)
    assert open_tile(tile, max_pixels=250_000).n_patches == 16  # sides up to 4 x sqrt(250,000) = 2,000 px
    with pytest.raises(DataError, match="more than the limit of 1,959 px a side"):
        open_tile(tile, max_pixels=240_000)  # 240,000 px in all, but a row of 2,000 px


@pytest.mark.parametrize(("count", "value", "fragment"), [
    (10, 1e30, "values 1e+30 .. 1e+30 outside the physical range of Sentinel-2 digital numbers (-1000 .. 100000)"),
    (2, 1e30, "values 300 .. 300 outside the physical range of Sentinel-1 dB (-100 .. 100)"),
    (2, -1e30, "values -1e+30 .. -1e+30 outside the physical range of Sentinel-1 dB (-100 .. 100)"),
])
def test_a_tile_of_absurd_values_is_refused_in_one_line(tmp_path, count, value, fragment):
    from rsretrieve.datasets.tile import read_tile
    from rsretrieve.errors import DataError

    tile = write_tile(tmp_path / "absurd.tif", value, count=count, width=120, height=120)
    with pytest.raises(DataError) as caught:
        read_tile(tile)
    assert str(caught.value).startswith(str(tile)) and fragment in str(caught.value) and "\n" not in str(caught.value)
    small = write_tile(tmp_path / "small.tif", value, count=count, width=60, height=60)  # read whole and resized
    with pytest.raises(DataError, match="outside the physical range"):
        read_tile(small)


# -- through the CLI ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from test_cli import indexed_workspace

    return indexed_workspace(tmp_path_factory.mktemp("untrusted"))


def _capped():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a reader that allocates what a header declares fails, not the machine


def query(ws: Path, *args):
    from test_cli import RSRETRIEVE

    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(ws), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*RSRETRIEVE, "query", *map(str, args)], capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=_capped)


def test_the_cli_refuses_a_huge_or_absurd_tile_in_one_line_and_the_cap_can_be_raised(ws, tmp_path):
    from test_cli import assert_clean_error

    huge = write_tile(tmp_path / "huge.tif", 1000, count=12, dtype="uint16", huge=True)
    assert_clean_error(query(ws, huge), str(huge), "declares 200,000 x 200,000 px", "--max-tile-pixels")
    absurd = write_tile(tmp_path / "absurd.tif", 1e30, width=120, height=120)
    assert_clean_error(query(ws, absurd), str(absurd), "outside the physical range")  # was "top 0", exit 0
    fine = write_tile(tmp_path / "fine.tif", 1000, dtype="uint16", width=240, height=120)
    assert_clean_error(query(ws, fine, "--max-tile-pixels", "10000"), str(fine), "240 x 120 px", "limit of 10,000 px")
    assert query(ws, fine, "--max-tile-pixels", "28800", "-k", "2").returncode == 0


def test_a_million_unknown_ids_are_a_count_and_five_lines_and_the_list_on_request(ws, tmp_path):
    ids = tmp_path / "ids.txt"
    unknown = [f"NOPE_{i:07d}" for i in range(1_000_000)]
    from test_cli import sample_patch_folder

    known = sample_patch_folder("s2", 3).name
    ids.write_text("\n".join([unknown[0], known, *unknown[1:]]) + "\n")
    listing = tmp_path / "unknown.txt"
    proc = query(ws, "--ids-file", ids, "-k", "2", "--format", "jsonl", "--unknown-ids", listing)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) < 20, proc.stderr[:2000]  # was a line per id
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 5 and "'NOPE_0000000'" in skipped[0] and "'NOPE_0000004'" in skipped[4], skipped
    assert "error: 1000000 of 1000001 queries failed (the first 5 named above; all in " in proc.stderr
    assert "the results of the other 1 were written" in proc.stderr
    assert listing.read_text().splitlines() == unknown
    assert {row.split('"query": "')[1].split('"')[0] for row in proc.stdout.splitlines()} == {known}
    without = query(ws, "--ids-file", ids, "-k", "2", "--format", "jsonl")
    assert "--unknown-ids FILE lists them all" in without.stderr and len(without.stderr.splitlines()) < 20


# -- checkpoints whose config lies about their tensors --------------------------------------------
CHECKPOINT_PROBE = bounded_probe("rsretrieve.models.checkpoint", "load_model", 8)  # the old loader's 51 GB model fails at 8 GiB


def test_a_checkpoint_claiming_embed_dim_65536_is_refused_before_its_model_is_built(tmp_path):
    import dataclasses
    import json

    from safetensors.torch import save_file

    from rsretrieve.models.checkpoint import FORMAT
    from rsretrieve.models.csmoe import create_model

    model = create_model("csmoe-tiny")
    lie = dataclasses.replace(model.config, embed_dim=65536)
    path = tmp_path / "liar.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": FORMAT, "config": lie.to_json()})
    assert json.loads(lie.to_json())["embed_dim"] == 65536 and path.stat().st_size < 8 << 20
    proc = subprocess.run([sys.executable, "-c", CHECKPOINT_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    message, figures = proc.stdout.strip().splitlines()
    growth_mb, seconds = figures.split()
    assert message.startswith(f"CheckpointError: {path}: checkpoint does not match config 'csmoe-tiny': "), proc.stdout + proc.stderr[-2000:]
    assert "shape mismatch: " in message and " vs model (" in message and "65536" in message
    import re

    key, ours, theirs = re.search(r"shape mismatch: (\S+) (\([^)]*\)) vs model (\([^)]*\))", message).groups()
    assert (key, ours, theirs) == ("cls_token", "(1, 1, 64)", "(1, 1, 65536)"), message  # the key and both shapes
    assert int(growth_mb) < 500, figures  # was the 51 GB model first
    print(f"\nembed_dim 65536 checkpoint: refused after {seconds} s, peak RSS growth {growth_mb} MB")


def test_a_checkpoint_of_nan_weights_stops_the_encode_in_one_line_naming_it(tmp_path):
    import torch

    from rsretrieve.models.checkpoint import save_model
    from rsretrieve.models.csmoe import create_model
    from test_cli import RSRETRIEVE, assert_clean_error

    model = create_model("csmoe-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    path = save_model(model, tmp_path / "nan.safetensors")
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([*RSRETRIEVE, "index", "--model", str(path), "--modality", "s2"], capture_output=True, text=True,
                              env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("index with NaN weights still running after 300 s")
    assert_clean_error(proc, str(path), "non-finite embeddings (NaN or inf) for 24 of 24 patches of chunk sample:s2:000000")


# -- duplicate ids in a dataset's metadata --------------------------------------------------------
def test_a_duplicated_metadata_row_is_refused_before_encoding_naming_the_id(tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rsretrieve.datasets import sample_root
    from test_cli import RSRETRIEVE, assert_clean_error

    root = tmp_path / "BigEarthNet-v2"
    shutil.copytree(sample_root(), root, ignore=shutil.ignore_patterns("majortom"))
    table = pq.read_table(root / "metadata.parquet")
    pq.write_table(pa.concat_tables([table, table.slice(2, 1)]), root / "metadata.parquet")
    twice = table.column("patch_id")[2].as_py()
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([*RSRETRIEVE, "encode", "--dataset", "benv2", "--data-root", str(root), "--modality", "s2",
                               "--model", "csmoe-tiny"], capture_output=True, text=True, env=env, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("encode over a duplicated row still running after 300 s")
    assert_clean_error(proc, str(root / "metadata.parquet"), f"1 patch_id value(s) on more than one row: {twice}")
    assert not list((tmp_path / "ws").rglob("*.zarr"))  # refused before a store was made
