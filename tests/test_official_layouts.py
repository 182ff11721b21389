"""Readers against the official layouts and the peers' own code: the BigEarthNet-v2 release tree
(TorchGeo's loader), Major TOM's grid and fragmenter. The golden files under tests/data/ were made
by the scripts in tools/golden/ (each says exactly what it ran)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rsretrieve import geo
from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.datasets.benv2 import patch_dir, product_of
from rsretrieve.datasets.majortom import windows
from rsretrieve.errors import DataError

DATA = Path(__file__).resolve().parent / "data"
ROOT = sample_root()


def cli(*args, workspace: Path, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "rsretrieve", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


# -- BigEarthNet-v2 release tree -----------------------------------------------------------------


def test_the_sample_is_in_the_release_layout():
    meta = pq.read_table(ROOT / "metadata.parquet").to_pylist()
    for row in meta:
        s1 = row["s1_name"]
        product = product_of(s1, "s1")
        assert not product.endswith(("_33UUP", "_35VNJ")) and s1.startswith(product + "_")
        assert (ROOT / "BigEarthNet-S1" / product / s1 / f"{s1}_VV.tif").is_file()
        assert patch_dir(ROOT, row["patch_id"], "s2").parent.name == row["patch_id"].rsplit("_", 2)[0]
    assert product_of("S1A_IW_GRDH_1SDV_20170613T165043_33UUP_75_43", "s1") == "S1A_IW_GRDH_1SDV_20170613T165043"


def test_s1_and_s2_pixels_equal_what_torchgeo_reads():
    """TorchGeo reads S1 bands sorted by name (VH, VV) as int32, i.e. dB rounded by GDAL (half away
    from zero): ours, rounded so, equal it exactly; its S2 10 m bands equal ours exactly."""
    golden = np.load(DATA / "torchgeo" / "torchgeo_golden.npz")
    ds = open_dataset("sample")
    for name, theirs in zip(golden["s1_ids"], golden["s1"]):
        raw = ds.read_patch(str(name), "s1")
        ours = np.stack([raw.band("VH")[0], raw.band("VV")[0]])
        np.testing.assert_array_equal(np.sign(ours) * np.floor(np.abs(ours) + 0.5), theirs)
        assert np.abs(ours - theirs).max() <= 0.5
    assert len(golden["s1_ids"]) == 18
    for name, theirs in zip(golden["s2_ids"], golden["s2_10m"]):
        raw = ds.read_patch(str(name), "s2")
        np.testing.assert_array_equal(np.stack([raw.band(b)[0] for b in golden["s2_10m_bands"]]), theirs)


@pytest.fixture()
def tree_copy(tmp_path) -> Path:
    root = tmp_path / "BigEarthNet-v2"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    return root


def test_an_encode_without_s1_folders_fails_in_one_line_naming_the_folder(tree_copy, tmp_path):
    shutil.rmtree(tree_copy / "BigEarthNet-S1")
    (tree_copy / "BigEarthNet-S1").mkdir()
    proc = cli("encode", "--dataset", "benv2", "--data-root", tree_copy, "--modality", "s1", "--model", "csmoe-tiny", workspace=tmp_path / "ws")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "BigEarthNet-S1/S1B_IW_GRDH_1SDV_20170612T165809/S1B_IW_GRDH_1SDV_20170612T165809_33UUP_" in lines[0]
    assert "no such folder" in lines[0]


def test_a_pre_release_layout_is_named_in_the_error(tree_copy):
    s1 = tree_copy / "BigEarthNet-S1"
    for folder in list(s1.glob("*/*")):  # move each patch into <product>_<tile>/, the old layout
        old = s1 / folder.name.rsplit("_", 2)[0]
        old.mkdir(exist_ok=True)
        folder.rename(old / folder.name)
    with pytest.raises(DataError, match="pre-release layout"):
        open_dataset("benv2", tree_copy, include_snow_cloud=True).chunks("s1")


def test_all_skipped_ends_non_zero_with_counts_and_a_partial_skip_is_recorded(tree_copy, tmp_path):
    ws = tmp_path / "ws"
    vv = sorted(tree_copy.glob("BigEarthNet-S1/*/*/*_VV.tif"))
    for path in vv:
        path.write_bytes(b"not a tiff")
    proc = cli("encode", "--dataset", "benv2", "--data-root", tree_copy, "--modality", "s1", "--model", "csmoe-tiny", workspace=ws)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "none of the 18 patches could be encoded" in line and "18 skipped: 18 unreadable GeoTIFF" in line
    # a second run does not pretend all is well: the store still holds no S1 patch
    again = cli("encode", "--dataset", "benv2", "--data-root", tree_copy, "--modality", "s1", "--model", "csmoe-tiny", workspace=ws)
    assert again.returncode == 1 and "none of the 18" in again.stderr

    # one unreadable patch out of 24 (4 %) is below the 5 % allowed: reported and recorded
    root2 = tmp_path / "one-bad"
    shutil.copytree(ROOT, root2, ignore=shutil.ignore_patterns("majortom"))
    bad = sorted(root2.glob("BigEarthNet-S1/*/*/*_VV.tif"))[0]
    bad.write_bytes(b"not a tiff")
    ok = cli("encode", "--dataset", "sample", "--modality", "s1", "--model", "csmoe-tiny", "--store", tmp_path / "s.zarr", workspace=ws)
    assert ok.returncode == 0
    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as c, Client(c) as client:
        summary = encode(DatasetSpec("benv2", str(root2), options=(("include_snow_cloud", True),)), "s1", tmp_path / "p.zarr",
                         EncoderSpec("csmoe-tiny", "cpu", 8), client=client)
    assert len(summary.skipped) == 1 and "1 unreadable GeoTIFF" in summary.skip_summary()
    from rsretrieve.store import EmbeddingStore

    assert EmbeddingStore(tmp_path / "p.zarr").skipped("s1")["by_reason"] == {"unreadable GeoTIFF": 1}


def test_unreadable_patches_over_the_share_fail_and_nodata_windows_do_not_count(tmp_path):
    from distributed import Client, LocalCluster
    from test_readers import write_synthetic_tiles

    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, TooManySkipped, encode

    root = tmp_path / "two-bad"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    for path in sorted(root.glob("BigEarthNet-S1/*/*/*_VV.tif"))[:2]:
        path.write_bytes(b"not a tiff")  # 2 of 24 = 8 %, over the 5 % allowed
    write_synthetic_tiles(tmp_path / "mt")  # one S1 window of 100 holds a nodata pixel
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        with pytest.raises(TooManySkipped, match=r"2 of 24 patches \(8%\) could not be read"):
            encode(DatasetSpec("benv2", str(root), options=(("include_snow_cloud", True),)), "s1", tmp_path / "a.zarr",
                   EncoderSpec("csmoe-tiny", "cpu", 8), client=client)
        summary = encode(DatasetSpec("majortom", str(tmp_path / "mt")), "s1", tmp_path / "b.zarr",
                         EncoderSpec("csmoe-tiny", "cpu", 8), client=client, max_failed_share=0.0)
    assert len(summary.skipped) == 1 and "invalid pixel(s)" in summary.skip_summary()  # a gap, not a failure


def test_lmdb_with_a_release_tree_gives_s1_centres(lmdb_root, tree_copy):
    """lat/lon of S1 patches from the tree's headers beside an LMDB (they were silently null when
    the tree's S1 layout was not the release's); a tree in another layout is an error, not nulls."""
    ds = open_dataset("benv2", lmdb_root, source="lmdb", tree_root=ROOT, include_snow_cloud=True)
    lats = ds.metadata("s1").column("lat").to_pylist()
    assert len(lats) == 24 and all(v is not None for v in lats)
    shutil.rmtree(tree_copy / "BigEarthNet-S1")
    (tree_copy / "BigEarthNet-S1").mkdir()
    with pytest.raises(DataError, match="no such folder"):
        open_dataset("benv2", lmdb_root, source="lmdb", tree_root=tree_copy, include_snow_cloud=True).metadata("s1")


def test_official_layout_end_to_end_cross_modal(tmp_path):
    """encode both, index S1, a cross-modal query: on the release tree, as a user runs it."""
    ws = tmp_path / "ws"
    cli("encode", "--dataset", "benv2", "--data-root", ROOT, "--modality", "both", "--model", "csmoe-tiny", workspace=ws, check=True)
    cli("index", "--modality", "s1", workspace=ws, check=True)
    (folder,) = ROOT.glob("BigEarthNet-S2/*/S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57")
    out = cli("query", folder, "--target", "s1", "-k", "3", "--format", "json", workspace=ws, check=True)
    hits = json.loads(out.stdout)["results"]
    assert len(hits) == 3 and all(h["patch_id"].startswith("S1") for h in hits)


# -- Major TOM ---------------------------------------------------------------------------------------


def test_grid_cells_equal_major_toms_grid():
    golden = np.load(DATA / "majortom" / "grid_golden.npz")
    got = np.array([geo.grid_indices(la, lo) for la, lo in zip(golden["lats"], golden["lons"])])
    mismatch = np.flatnonzero((got[:, 0] != golden["rows"]) | (got[:, 1] != golden["cols"]))
    assert mismatch.size == 0, [(golden["lats"][i], golden["lons"][i], tuple(got[i])) for i in mismatch[:5]]
    assert len(golden["lats"]) >= 10_000
    assert geo.grid_cell(59.8058, -179.9813) == "665U_1010R"  # the antimeridian case of the issue
    with pytest.raises(ValueError, match="outside Major TOM's grid"):
        geo.grid_cell(-89.0, 10.0)  # Major TOM's code wraps this to the top row, 946U


def test_major_tom_windows_equal_its_fragmenter():
    golden = json.loads((DATA / "majortom" / "fragments_golden.json").read_text())
    for size, offsets in golden["offsets"].items():
        assert [[r, c] for r, c, _, _ in windows(1068, 1068, int(size))] == offsets
    assert len(windows(1068, 1068, 120)) == 100
    assert len(windows(1068, 1068, 120, "grid")) == 64  # the CSMoE paper's 8 x 8


def test_major_tom_reader_cuts_whole_cells_and_records_the_rule(tmp_path):
    from test_readers import write_synthetic_tiles

    write_synthetic_tiles(tmp_path)
    whole = open_dataset("majortom", tmp_path)
    batch = whole.read_chunk(whole.chunks("s2")[0])
    assert len(batch) == 100 and batch.pixels.coarse_cell is not None  # odd origins: 20 m blocks and their place in the cell
    assert sorted({w[0] for w in batch.meta.column("window").to_pylist()})[-1] == 948
    assert whole.describe()["windows"] == "majortom"
    paper = open_dataset("majortom", tmp_path, windows="grid")
    grid_batch = paper.read_chunk(paper.chunks("s2")[0])
    assert len(grid_batch) == 64 and grid_batch.pixels.coarse.shape[-1] == 60
