"""The `rsretrieve` command as a user runs it: real processes, real exit codes, the bundled sample."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from rsretrieve.datasets import sample_root

RSRETRIEVE = [sys.executable, "-m", "rsretrieve"]
MODEL = "csmoe-tiny"


def run(args, workspace, check=True):
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*RSRETRIEVE, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"rsretrieve {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def indexed_workspace(workspace: Path) -> Path:
    """A workspace with both modalities of the sample encoded and indexed by the small model."""
    run(["index", "--model", MODEL], workspace)
    return workspace


def assert_clean_error(proc, *fragments):
    """Exit 1 with a one-line message on stderr naming the problem, and no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def sample_patch_folder(modality: str, index: int = 0) -> Path:
    root = sample_root() / ("BigEarthNet-S1" if modality == "s1" else "BigEarthNet-S2")
    return sorted(p for p in root.glob("*/*") if p.is_dir())[index]


@pytest.fixture(scope="module")
def s1_tile(tmp_path_factory) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from stack_bands import stack

    return stack(sample_patch_folder("s1"), tmp_path_factory.mktemp("tiles") / "query_s1.tif")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("workspace")
    first = run(["index", "--modality", "s1", "--model", MODEL], ws)
    assert "RANDOM WEIGHTS" in first.stderr  # random-init is said loudly
    assert "index built flat over 24 vectors" in first.stdout
    run(["index", "--modality", "s2"], ws)  # the model is remembered
    return ws


def test_help_and_version(tmp_path):
    out = run(["--help"], tmp_path).stdout
    for command in ("info", "models", "encode", "index", "query", "eval"):
        assert command in out
    assert run(["--version"], tmp_path).stdout.startswith("rsretrieve ")


def test_info_json_reports_workspace_and_stores(workspace):
    data = json.loads(run(["info", "--json"], workspace).stdout)
    assert Path(data["workspace"]) == workspace.resolve()
    (store,) = data["stores"]
    assert data["current"] == {"dataset": "sample", "subset": None, "root": None, "model": MODEL, "checkpoint": None,
                               "windows": None, "filters": {}, "store": store["path"]}
    for modality in ("s1", "s2"):
        row = store["modalities"][modality]
        assert row["encoded"] == row["patches"] == 24 and row["complete"] and row["random_init"]


def test_workspace_option_overrides_the_environment(tmp_path, workspace):
    other = tmp_path / "elsewhere"
    data = json.loads(run(["--workspace", other, "info", "--json"], workspace).stdout)
    assert Path(data["workspace"]) == other.resolve() and data["stores"] == []


def test_index_again_does_nothing(workspace):
    out = run(["index", "--modality", "s1"], workspace).stdout
    assert "nothing to do" in out and "up to date" in out


def test_query_tile_cross_modal_with_mosaic(workspace, s1_tile, tmp_path):
    mosaic = tmp_path / "m.png"
    proc = run(["query", s1_tile, "--target", "s2", "-k", "3", "--format", "json", "--mosaic", mosaic], workspace)
    result = json.loads(proc.stdout)
    assert result["query_modality"] == "s1" and result["target"] == "s2" and result["random_init"]
    hits = result["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(hits[i]["score"] >= hits[i + 1]["score"] for i in range(2))
    assert all(h["patch_id"].startswith("S2") and h["labels"] for h in hits)
    picture = np.asarray(Image.open(mosaic).convert("RGB"))
    assert picture.shape[1] > 3 * picture.shape[0] / 2  # query beside three results
    assert picture.std() > 10  # a real picture, not a blank canvas


def test_query_by_id_excludes_itself_and_geojson(workspace):
    ids = json.loads(run(["query", "--id", sample_patch_folder("s2", 3).name, "--target", "s2", "-k", "5", "--format", "json"], workspace).stdout)
    assert sample_patch_folder("s2", 3).name not in [h["patch_id"] for h in ids["results"]]
    assert len(ids["results"]) == 5
    geo = json.loads(run(["query", "--id", sample_patch_folder("s2", 3).name, "--target", "s1", "-k", "2", "--format", "geojson"], workspace).stdout)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 1 + 2  # the query's footprint, then its results'
    lon, lat = geo["features"][1]["geometry"]["coordinates"][0][0]  # a result's footprint, a Polygon
    assert 40 < lat < 70 and 5 < lon < 35  # Austria / Finland


def test_eval_sample_reports_all_tasks_stamped_random(workspace, tmp_path):
    out = tmp_path / "eval.json"
    proc = run(["eval", "sample", "--output", out], workspace)
    for task in ("S1S1", "S2S2", "S1S2", "S2S1"):
        assert task in proc.stdout
    assert "RANDOM" in proc.stdout
    data = json.loads(out.read_text())
    assert data["random_init"] is True and data["subset"] == "sample"
    assert data["protocol"]["k"] == 3
    for task in ("s1s1", "s2s2", "s1s2", "s2s1"):
        t = data["tasks"][task]
        assert t["n_queries"] == 6 and t["n_archive"] == 6  # validation / test of the 18 clear pairs
        p, r = t["precision"], t["recall"]
        assert t["f1"] == pytest.approx(2 * p * r / (p + r))
        assert 0 < t["f1_macro"] <= 1 and "f1_macro" in data["protocol"]  # both F1s, labelled
    # on this sample every archive patch shares a label with every query: mAP says so, not 100 % alone
    assert all(data["tasks"][t]["map_uninformative"] for t in ("s1s1", "s2s2", "s1s2", "s2s1"))
    assert "macro" in proc.stdout and "mAP@3 is 100 % for any ranking" in " ".join(proc.stdout.split())


# -- bad input: one line, exit 1, no traceback ----------------------------------------------------
def test_query_before_any_index(tmp_path, s1_tile):
    assert_clean_error(run(["query", s1_tile, "--target", "s2"], tmp_path, check=False), "no embeddings yet")


def test_query_wrong_modality(workspace, s1_tile):
    assert_clean_error(run(["query", s1_tile, "--modality", "s2", "--target", "s2"], workspace, check=False), "query_s1.tif")


def test_query_k_larger_than_archive(workspace, s1_tile):
    """A k over the archive's size gives the whole archive, and says so in a one-line note."""
    proc = run(["query", s1_tile, "--target", "s2", "-k", "100", "--format", "json"], workspace)
    assert len(json.loads(proc.stdout)["results"]) == 24
    assert "note: the archive holds 24 S2 patches; returning 24 results, not 100" in proc.stderr


def test_query_corrupt_tile(workspace, tmp_path, s1_tile):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(s1_tile.read_bytes()[:400])
    assert_clean_error(run(["query", bad, "--target", "s2"], workspace, check=False), "broken.tif")


def test_query_tile_with_nan(workspace, tmp_path, s1_tile):
    nan_tile = tmp_path / "nan.tif"
    with rasterio.open(s1_tile) as src:
        data, profile = src.read(), src.profile
    data[0, 5, 5] = np.nan
    with rasterio.open(nan_tile, "w", **profile) as dst:
        dst.write(data)
    assert_clean_error(run(["query", nan_tile, "--target", "s2"], workspace, check=False), "nan.tif")


def test_unknown_eval_name(workspace):
    assert_clean_error(run(["eval", "BENv2-99k"], workspace, check=False), "BENv2-99k")


def test_missing_checkpoint(tmp_path):
    assert_clean_error(run(["index", "--checkpoint", tmp_path / "nope.safetensors"], tmp_path, check=False), "nope.safetensors")


def test_corrupt_checkpoint_leaves_the_store_untouched(workspace, tmp_path):
    store = next((workspace / "stores").glob("*.zarr"))
    before = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file())
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert_clean_error(run(["encode", "--checkpoint", bad, "--store", store], workspace, check=False), "broken.safetensors")
    after = sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*") if p.is_file())
    assert before == after


def test_models_json_matches_table_iv(tmp_path):
    rows = {r["name"]: r for r in json.loads(run(["models", "--json"], tmp_path).stdout)}
    paper = {"csmoe-p14": (271e6, 13.40e9), "csmoe-p16": (271e6, 10.11e9), "csmoe-p28": (275e6, 3.67e9), "csmoe-p32": (277e6, 2.92e9)}
    for name, (params, macs) in paper.items():
        assert abs(rows[name]["params"] / params - 1) <= 0.03, name
        assert abs(rows[name]["macs"] / macs - 1) <= 0.15, name
    table = run(["models"], tmp_path).stdout
    assert "csmae-p15" in table and "5.64B" in table


def test_benv2_root_is_remembered_and_subset_count_reported(tmp_path):
    """The sample tree is a BigEarthNet-v2 release root: the subset count differs from the paper's
    and is reported; later commands need no path; k above the archive size is refused."""
    first = run(["index", "--dataset", "benv2", "--data-root", sample_root(), "--subset", "BENv2-243k", "--model", MODEL, "--modality", "s2"], tmp_path)
    assert "expected 243,130 pairs, found 18" in first.stdout  # 3 snowy + 3 cloudy pairs excluded
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["datasets"]["benv2"]["root"] == str(sample_root())
    assert_clean_error(run(["eval", "BENv2-243k", "--tasks", "s2s2"], tmp_path, check=False), "k=10", "6 patches")
    out = tmp_path / "f1.json"
    run(["eval", "BENv2-243k", "--tasks", "s2s2", "-k", "3", "--output", out], tmp_path)
    assert json.loads(out.read_text())["tasks"]["s2s2"]["n_archive"] == 6
    # dataset, subset and model are current now: a query needs no options to find their store
    hits = json.loads(run(["query", "--id", sample_patch_folder("s2", 0).name, "--target", "s2", "-k", "2", "--format", "json"], tmp_path).stdout)
    assert len(hits["results"]) == 2
    assert_clean_error(run(["index", "--subset", "BENv2-99k"], tmp_path, check=False), "BENv2-99k", "BENv2-14k")


def test_more_bad_input_is_one_line(tmp_path, workspace, s1_tile):
    assert_clean_error(run(["index", "--data-root", tmp_path], tmp_path, check=False), "--data-root needs --dataset benv2")
    assert_clean_error(run(["query", tmp_path / "missing.tif", "--target", "s2"], workspace, check=False), "missing.tif", "no such file")
    assert_clean_error(run(["eval", "sample", "--output", tmp_path / "nowhere" / "f1.json"], workspace, check=False), "does not exist")
    assert_clean_error(run(["query", s1_tile, "--mosaic", tmp_path], workspace, check=False), "is a folder")
    assert_clean_error(run(["encode", "--scheduler", "tcp://127.0.0.1:9", "--store", tmp_path / "s.zarr", "--modality", "s1"], workspace, check=False), "--scheduler")
    assert_clean_error(run(["index", "--dataset", "sample", "--subset", "BENv2-14k", "--store", tmp_path / "e.zarr"], workspace, check=False), "no S1 patches")


def test_eval_name_is_case_insensitive(workspace):
    assert "S1S1" in run(["eval", "Sample", "--tasks", "s1s1"], workspace).stdout


def test_query_with_a_patch_folder(workspace, tmp_path):
    mosaic = tmp_path / "folder.png"
    result = json.loads(run(["query", sample_patch_folder("s2", 2), "--target", "s1", "-k", "2", "--format", "json", "--mosaic", mosaic], workspace).stdout)
    assert result["query_modality"] == "s2" and len(result["results"]) == 2
    assert mosaic.stat().st_size > 10_000


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_fails_before_writing(tmp_path):
    store = tmp_path / "cuda.zarr"
    assert_clean_error(run(["index", "--device", "cuda", "--model", MODEL, "--store", store], tmp_path, check=False), "no CUDA device")
    assert not store.exists()


def test_float16_and_float32_choose_the_store_dtype_and_a_store_keeps_its_own(tmp_path):
    import zarr

    store = tmp_path / "half.zarr"
    common = ["encode", "--model", MODEL, "--modality", "s2", "--store", store]
    run([*common, "--float16"], tmp_path / "ws")
    assert zarr.open_group(store / "s2", mode="r")["embedding"].dtype == "float16"
    again = run([*common, "--float32"], tmp_path / "ws", check=False)
    assert_clean_error(again, str(store), "as float16, not float32", "--float16/--float32")
    run(common, tmp_path / "ws")  # no flag: the store's own dtype
    run(["encode", "--model", MODEL, "--modality", "s2", "--store", tmp_path / "full.zarr", "--float32"], tmp_path / "ws")
    assert zarr.open_group(tmp_path / "full.zarr" / "s2", mode="r")["embedding"].dtype == "float32"
