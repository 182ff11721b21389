"""What a user meets running rsretrieve on data others made (issue 22): the official BigEarthNet-v2
tree with a file missing, moved, or only one Major TOM collection downloaded, and a workspace with
stores of two window rules. Real processes and exit codes, on copies of the bundled real sample."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rsretrieve.datasets import sample_root

ROOT = sample_root()
MODEL = "csmoe-tiny"


def cli(*args, workspace: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "rsretrieve", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (and no traceback)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def two_patch_tree(tmp_path: Path) -> tuple[Path, list[dict]]:
    """The release tree of the sample's first two pairs (metadata cut to them), S1 VH of the second
    missing, as a partial download leaves it."""
    root = tmp_path / "BigEarthNet-v2"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    meta = pq.read_table(root / "metadata.parquet").slice(0, 2)
    pq.write_table(meta, root / "metadata.parquet")
    snow = root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
    pq.write_table(pq.read_table(snow).slice(0, 0), snow)
    rows = meta.to_pylist()
    missing = next(root.glob(f"BigEarthNet-S1/*/{rows[1]['s1_name']}/{rows[1]['s1_name']}_VH.tif"))
    missing.unlink()
    return root, rows


def test_the_skipped_share_gives_the_same_answer_every_run_and_max_skipped_accepts_it(tmp_path):
    root, rows = two_patch_tree(tmp_path)
    ws = tmp_path / "ws"
    command = ("index", "--dataset", "benv2", "--data-root", root, "--modality", "both", "--model", MODEL)
    first, second = cli(*command, workspace=ws), cli(*command, workspace=ws)
    assert "RANDOM WEIGHTS" in first.stderr  # said on a failing first run in a fresh workspace too
    for proc in (first, second):
        line = error_line(proc)
        assert "S1: 1 of 2 patches (50%) could not be read" in line and "--max-skipped 0.50" in line, line
        assert "missing band file" in line and rows[1]["s1_name"] in line, line  # counts by reason, the first paths
    assert error_line(first) == error_line(second)
    assert "S2: encoded 2 patches" in first.stdout  # the other modality was encoded all the same

    accepted = ok(cli(*command, "--max-skipped", "0.6", workspace=ws))
    assert "S1: index built flat over 1 vectors" in accepted.stdout and "S2: index built flat over 2 vectors" in accepted.stdout
    hits = json.loads(ok(cli("query", "--id", rows[0]["patch_id"], "--target", "s1", "-k", "1", "--format", "json", workspace=ws)).stdout)
    assert [h["patch_id"] for h in hits["results"]] == [rows[0]["s1_name"]]


def test_windows_rule_is_part_of_the_selection_query_uses(tmp_path):
    ws = tmp_path / "ws"
    mt = ("--dataset", "majortom", "--data-root", ROOT / "majortom", "--modality", "s2", "--model", MODEL)
    ok(cli("index", *mt, workspace=ws))
    ok(cli("index", *mt, "--windows", "grid", workspace=ws))
    stores = sorted(p.name for p in (ws / "stores").glob("*.zarr"))
    assert stores == [f"majortom--{MODEL}-gridwindows.zarr", f"majortom--{MODEL}.zarr"]
    some_id = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP/539U_97R/0_0"

    plain = ok(cli("query", "--id", some_id, "--target", "s2", "-k", "2", "--format", "json", workspace=ws))
    assert f"using majortom--{MODEL}-gridwindows.zarr (windows grid)" in plain.stderr  # which one, said
    assert f"majortom--{MODEL}.zarr" in plain.stderr  # and the other one it could have meant
    info = json.loads(ok(cli("info", "--json", workspace=ws)).stdout)
    assert (info["current"]["windows"], Path(info["current"]["store"]).name) == ("grid", f"majortom--{MODEL}-gridwindows.zarr")

    shutil.rmtree(ws / "stores" / f"majortom--{MODEL}.zarr")  # the grid store alone: it is found, not "no embeddings yet"
    alone = ok(cli("query", "--id", some_id, "--target", "s2", "-k", "2", "--format", "json", workspace=ws))
    assert json.loads(alone.stdout)["results"] == json.loads(plain.stdout)["results"]
    assert "note: using" not in alone.stderr  # nothing else it could mean: no note

    back = ok(cli("index", *mt, "--windows", "majortom", workspace=ws))  # --windows majortom: the default store again
    assert (ws / "stores" / f"majortom--{MODEL}.zarr").is_dir() and "gridwindows" not in back.stdout


def test_a_major_tom_root_with_one_collection_encodes_it_and_says_the_other_is_absent(tmp_path):
    root = tmp_path / "majortom"
    shutil.copytree(ROOT / "majortom", root, ignore=shutil.ignore_patterns("Core-S1RTC"))
    ws = tmp_path / "ws"
    both = ok(cli("encode", "--dataset", "majortom", "--data-root", root, "--model", MODEL, workspace=ws))
    assert "S1 is absent" in both.stdout and "no Core-S1RTC parquet shards found" in both.stdout, both.stdout
    assert "S2: encoded 24 patches" in both.stdout
    asked = cli("encode", "--dataset", "majortom", "--data-root", root, "--modality", "s1", "--model", MODEL, workspace=ws)
    assert "no Core-S1RTC parquet shards found" in error_line(asked)  # asked for the absent one: an error


def test_a_moved_root_with_the_same_patches_is_accepted_and_recorded(tmp_path):
    first, moved = tmp_path / "a" / "BigEarthNet-v2", tmp_path / "b" / "BigEarthNet-v2"
    shutil.copytree(ROOT, first, ignore=shutil.ignore_patterns("majortom"))
    ws = tmp_path / "ws"
    ok(cli("index", "--dataset", "benv2", "--data-root", first, "--modality", "s2", "--model", MODEL, workspace=ws))
    moved.parent.mkdir()
    first.rename(moved)
    again = ok(cli("index", "--dataset", "benv2", "--data-root", moved, "--modality", "s2", workspace=ws))
    assert f"the data moved from {first} to {moved}" in again.stdout, again.stdout
    assert "S2: index up to date" in again.stdout  # the embeddings and their index stand
    info = json.loads(ok(cli("info", "--json", workspace=ws)).stdout)
    assert info["stores"][0]["modalities"]["s2"]["dataset"]["root"] == str(moved)
    assert info["datasets"]["benv2"]["root"] == str(moved)
    quiet = ok(cli("index", "--modality", "s2", workspace=ws))
    assert "the data moved" not in quiet.stdout  # recorded once


def test_the_random_weights_notice_comes_as_soon_as_the_model_is_known(tmp_path):
    """A first run that fails after loading a random-init model still says so (here: the metadata
    selects no patch, found only once the model was described)."""
    root = tmp_path / "BigEarthNet-v2"
    shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns("majortom"))
    for name in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        pq.write_table(pq.read_table(root / name).slice(0, 0), root / name)
    proc = cli("encode", "--dataset", "benv2", "--data-root", root, "--modality", "s2", "--model", MODEL, workspace=tmp_path / "ws")
    assert "the selection holds no S2 patches" in error_line(proc)
    assert "RANDOM WEIGHTS" in proc.stderr


def test_dask_is_silent_below_vv_and_heard_at_vv():
    from rsretrieve.cli._app import set_log_level
    from rsretrieve.indexer.cluster import dask_log_level

    saved = {name: logging.getLogger(name).level for name in ("rsretrieve", "distributed", "dask", "tornado", "asyncio")}
    saved_env = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    try:
        for verbose in (0, 1):
            set_log_level(verbose)
            assert not logging.getLogger("distributed.worker").isEnabledFor(logging.ERROR)  # a heartbeat's CommClosedError
            assert dask_log_level() > logging.ERROR  # the cluster's worker processes too
        set_log_level(2)
        assert logging.getLogger("distributed.worker").isEnabledFor(logging.DEBUG) and dask_log_level() == logging.DEBUG
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        if saved_env is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)
        else:
            os.environ["DASK_LOGGING__DISTRIBUTED"] = saved_env


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_failing_run_prints_no_dask_lines(tmp_path, verbose):
    root, _ = two_patch_tree(tmp_path)
    proc = cli(*verbose, "encode", "--dataset", "benv2", "--data-root", root, "--modality", "s1", "--model", MODEL, workspace=tmp_path / "ws")
    error_line(proc)
    assert not [line for line in proc.stderr.splitlines() if "distributed" in line or "tornado" in line], proc.stderr
