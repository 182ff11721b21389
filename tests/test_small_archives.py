"""Archives smaller than k, and archives without coordinates (a rico-hdl LMDB without the GeoTIFF
tree): `rsretrieve query` returns what there is with a one-line note, and its JSON outputs stay
JSON (null, never a bare NaN) that strict parsers read."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rsretrieve.io.jsontext import dumps
from rsretrieve.retrieval.results import Hit, QueryResult, results_text
from test_cli import MODEL, run, sample_patch_folder


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, as JSON.parse and jq do."""
    assert "NaN" not in text and "Infinity" not in text, text[:400]

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def one_patch_ws(lmdb_root, tmp_path_factory) -> tuple[Path, str]:
    """A workspace whose S2 archive holds one patch, encoded from an LMDB (no lat/lon), and its id."""
    root = tmp_path_factory.mktemp("one_patch")
    shutil.copytree(lmdb_root / "BigEarthNet-V2-LMDB", root / "BigEarthNet-V2-LMDB")
    table = pq.read_table(lmdb_root / "metadata.parquet")
    pq.write_table(table.slice(0, 1), root / "metadata.parquet")
    snow = pq.read_table(lmdb_root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    pq.write_table(snow.slice(0, 0), root / "metadata_for_patches_with_snow_cloud_or_shadow.parquet")
    ws = root / "ws"
    out = run(["index", "--dataset", "benv2", "--data-root", root, "--model", MODEL, "--modality", "s2"], ws)
    assert "index built flat over 1 vectors" in out.stdout
    return ws, table.column("patch_id")[0].as_py()


def test_k_larger_than_a_one_patch_archive_returns_it_with_a_note(one_patch_ws):
    ws, _ = one_patch_ws
    proc = run(["query", sample_patch_folder("s2", 0), "--target", "s2", "-k", "10", "--format", "json"], ws)
    assert len(strict_json(proc.stdout)["results"]) == 1
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: the archive holds 1 S2 patch; returning 1 result, not 10"], proc.stderr
    # a batch: every query gets the one patch, one note for all
    batch = run(["query", sample_patch_folder("s2", 0), sample_patch_folder("s2", 1), "--target", "s2", "-k", "10", "--format", "jsonl"], ws)
    rows = [strict_json(line) for line in batch.stdout.splitlines()]
    assert [r["rank"] for r in rows] == [1, 1] and len({r["query"] for r in rows}) == 2
    assert batch.stderr.count("note: the archive holds 1 S2 patch; returning 1 result, not 10") == 1


def test_the_one_patch_queried_by_id_has_no_other_to_return(one_patch_ws):
    ws, patch_id = one_patch_ws
    proc = run(["query", "--id", patch_id, "--target", "s2", "-k", "10", "--format", "json"], ws)
    assert strict_json(proc.stdout)["results"] == []
    assert "note: the archive holds 1 S2 patch; returning 0 results, not 10 (a query's own patch is left out" in proc.stderr


def test_json_outputs_without_coordinates_are_valid_json(one_patch_ws, tmp_path):
    ws, _ = one_patch_ws
    folder = sample_patch_folder("s2", 0)
    hit = strict_json(run(["query", folder, "--target", "s2", "-k", "1", "--format", "json"], ws).stdout)["results"][0]
    assert hit["lat"] is None and hit["lon"] is None  # an LMDB without the tree: no coordinates
    for fmt in ("jsonl", "geojson"):
        strict_json(run(["query", folder, "--target", "s2", "-k", "1", "--format", fmt], ws).stdout)
    run(["query", folder, "--target", "s2", "-k", "1", "--output", tmp_path / "hits.json"], ws)
    assert strict_json((tmp_path / "hits.json").read_text())["results"][0]["lat"] is None


def test_json_text_turns_every_non_finite_number_into_null():
    nan = float("nan")
    hit = Hit(1, "p", "p", nan, ["Pastures"], "test", nan, float("inf"), 0)
    result = QueryResult("q", "s2", "s2", [hit], {"model": "m", "checkpoint_sha256": "random-init"}, source="q")
    for fmt in ("json", "jsonl", "geojson"):
        strict_json(results_text([result], fmt))
    parsed = strict_json(dumps({"a": np.float32("nan"), "b": [np.float64(1.5), -np.inf], "c": (np.int64(3), Path("x"))}))
    assert parsed == {"a": None, "b": [1.5, None], "c": [3, "x"]}
