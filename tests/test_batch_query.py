"""Many queries at once (`rsretrieve query` with several tiles, folders, patterns, stdin or an ids
file): one model load, one faiss search, one table that fits 80 columns, and machine formats
(JSON Lines, CSV, JSON, GeoJSON, GeoParquet) that read back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rsretrieve.datasets import sample_root
from test_cli import RSRETRIEVE, assert_clean_error, indexed_workspace

K = 3
S2_FOLDERS = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())
COLUMNS = ["query", "query_modality", "target", "rank", "patch_id", "pair_id", "score", "labels", "split", "lat", "lon", "random_init"]


def query(args, workspace, stdin=None, columns=80, check=True):
    """`rsretrieve query ...` on a terminal of `columns` columns, with `stdin` piped in."""
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": str(columns), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*RSRETRIEVE, "query", *map(str, args)], input=stdin or "", capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"query {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def by_name(rows: list[dict]) -> dict[str, list[tuple[str, float]]]:
    """{query's patch name: [(hit id, score), ...] in rank order}, whatever form named the query."""
    found: dict[str, list] = {}
    for row in sorted(rows, key=lambda r: (r["query"], r["rank"])):
        found.setdefault(Path(row["query"]).name, []).append((row["patch_id"], row["score"]))
    return found


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return indexed_workspace(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def batch(ws) -> subprocess.CompletedProcess:
    """The 24 S2 patch folders of the sample, as the shell expands `BigEarthNet-S2/*/*`."""
    return query([*S2_FOLDERS, "--target", "s1", "-k", K, "--format", "jsonl"], ws)


@pytest.fixture(scope="module")
def archive(ws):
    from rsretrieve.retrieval.archive import Archive

    return Archive.open(next((ws / "stores").glob("*.zarr")), ws / "indexes")


# -- one model load, one search, 24 result sets ------------------------------------------------------
def test_24_patch_folders_give_24_result_sets_with_one_model_load(batch):
    rows = jsonl(batch.stdout)
    assert len(rows) == 24 * K
    assert {Path(r["query"]).name for r in rows} == {p.name for p in S2_FOLDERS}
    assert all(list(r) == COLUMNS for r in rows)
    assert all(r["random_init"] is True and r["query_modality"] == "s2" and r["target"] == "s1" for r in rows)
    assert sorted(r["rank"] for r in rows) == sorted(list(range(1, K + 1)) * 24)
    assert "24 queries: model loaded once" in batch.stderr and "1 faiss search " in batch.stderr
    assert "RANDOM WEIGHTS" in batch.stderr


def test_the_api_loads_the_model_once_and_searches_once(archive, monkeypatch):
    import rsretrieve.models.inference as inference
    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    calls = {"model": 0, "search": 0}
    load, search = inference.model_for_provenance, EmbeddingIndex.search

    def counted_load(*args, **kwargs):
        calls["model"] += 1
        return load(*args, **kwargs)

    def counted_search(self, *args, **kwargs):
        calls["search"] += 1
        return search(self, *args, **kwargs)

    monkeypatch.setattr(inference, "model_for_provenance", counted_load)
    monkeypatch.setattr(EmbeddingIndex, "search", counted_search)
    archive._model = None
    results = archive.query_tiles(S2_FOLDERS, "s1", K)
    assert len(results) == 24 and not results.failed
    assert calls == {"model": 1, "search": 1}
    assert [r.source for r in results] == [str(p) for p in S2_FOLDERS]
    archive.query_tiles(S2_FOLDERS[:2], "s2", K)  # the model stays loaded for later queries
    assert calls["model"] == 1


# -- every way of naming the batch gives the same results ----------------------------------------------
def test_folder_pattern_stdin_and_ids_file_forms_agree(ws, batch, tmp_path):
    expected = by_name(jsonl(batch.stdout))
    folder = tmp_path / "queries"
    folder.mkdir()
    for patch in S2_FOLDERS:  # a folder of patch folders
        (folder / patch.name).symlink_to(patch, target_is_directory=True)
    (folder / "notes.txt").write_text("not a tile: ignored")
    pattern = str(sample_root() / "BigEarthNet-S2" / "*" / "*")  # quoted: the program expands it
    stdin = "\n".join(map(str, S2_FOLDERS)) + "\n\n"
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# S2 patches of the sample\n" + "\n".join(p.name for p in S2_FOLDERS) + "\n")
    forms = {"folder": ([folder], None), "pattern": ([pattern], None), "stdin": (["-"], stdin), "ids-file": (["--ids-file", ids_file], None)}
    for form, (args, piped) in forms.items():
        got = by_name(jsonl(query([*args, "--target", "s1", "-k", K, "--format", "jsonl"], ws, stdin=piped).stdout))
        assert got.keys() == expected.keys(), form
        for name, hits in expected.items():  # stored embeddings vs. embedded again: the same model, the same ranking
            assert [h for h, _ in got[name]] == [h for h, _ in hits], (form, name)
            assert np.allclose([s for _, s in got[name]], [s for _, s in hits], atol=1e-4), (form, name)


# -- machine formats read back --------------------------------------------------------------------
def test_csv_and_geoparquet_read_back(ws, batch, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq
    import shapely

    out_csv, out_parquet = tmp_path / "hits.csv", tmp_path / "hits.parquet"
    query([*S2_FOLDERS, "--target", "s1", "-k", K, "--output", out_csv], ws)
    query([*S2_FOLDERS, "--target", "s1", "-k", K, "-o", out_parquet], ws)
    rows = jsonl(batch.stdout)
    table = pd.read_csv(out_csv)
    assert list(table.columns) == COLUMNS and len(table) == 24 * K
    assert set(table["patch_id"]) == {r["patch_id"] for r in rows}
    assert all(isinstance(x, str) and x for x in table["labels"])  # labels joined with "; "

    parquet = pq.read_table(out_parquet)
    geo = json.loads(parquet.schema.metadata[b"geo"])
    assert geo["version"].startswith("1.1") and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Point"] and "crs" not in column  # OGC:CRS84
    assert json.loads(parquet.schema.metadata[b"rsretrieve"])["random_init"] is True
    frame = parquet.to_pandas()
    assert len(frame) == 24 * K and set(COLUMNS) <= set(frame.columns)
    assert list(frame.iloc[0]["labels"])  # a list column, not a joined string
    points = shapely.from_wkb(frame["geometry"].to_numpy())
    assert np.allclose(shapely.get_x(points), frame["lon"]) and np.allclose(shapely.get_y(points), frame["lat"])
    xmin, ymin, xmax, ymax = column["bbox"]
    assert xmin == frame["lon"].min() and ymax == frame["lat"].max()


def test_geoparquet_meets_the_spec_schema_and_reads_in_geopandas(ws, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    gpd = pytest.importorskip("geopandas")
    from test_export import GEO_SCHEMA  # the GeoParquet 1.1.0 schema, as `rsretrieve export` is checked against

    out = tmp_path / "hits.geoparquet"
    query(["--id", S2_FOLDERS[0].name, "--id", S2_FOLDERS[5].name, "--target", "s1", "-k", K, "-o", out], ws)
    import pyarrow.parquet as pq

    jsonschema.validate(json.loads(pq.read_schema(out).metadata[b"geo"]), GEO_SCHEMA)
    frame = gpd.read_parquet(out)
    assert frame.crs.to_string() == "OGC:CRS84" and len(frame) == 2 * K
    assert np.allclose(frame.geometry.x, frame["lon"]) and np.allclose(frame.geometry.y, frame["lat"])


def test_json_is_a_list_for_a_batch_and_an_object_for_one_tile(ws):
    many = json.loads(query([*S2_FOLDERS[:3], "--target", "s1", "-k", 2, "--json"], ws).stdout)
    assert isinstance(many, list) and len(many) == 3 and all(len(r["results"]) == 2 for r in many)
    assert [r["query"] for r in many] == [str(p) for p in S2_FOLDERS[:3]]
    one = json.loads(query([S2_FOLDERS[0], "--target", "s1", "--k", 2, "--format", "json"], ws).stdout)  # --k: the old spelling
    assert isinstance(one, dict) and one["query_kind"] == "tile" and len(one["results"]) == 2
    geo = json.loads(query(["--id", S2_FOLDERS[0].name, "--id", S2_FOLDERS[1].name, "--target", "s1", "-k", 2, "--format", "geojson"], ws).stdout)
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == 2 + 4  # each query's footprint, then its results'
    assert [f["properties"]["role"] for f in geo["features"]].count("result") == 4
    assert {f["properties"]["query"] for f in geo["features"]} == {S2_FOLDERS[0].name, S2_FOLDERS[1].name}


# -- the terminal table -----------------------------------------------------------------------------
def test_tables_fit_80_columns_and_wide_shows_full_ids(ws, batch):
    for args in ([*S2_FOLDERS, "--target", "s1"], [S2_FOLDERS[0], "--target", "s2"], ["--ids-file", "-", "--target", "s2"]):
        piped = "\n".join(p.name for p in S2_FOLDERS[:5]) if "--ids-file" in args else None
        out = query([*args, "-k", K], ws, stdin=piped).stdout
        lines = out.splitlines()
        assert len(lines) > K and max(len(line) for line in lines) <= 80, out
        assert "RANDOM WEIGHTS" in out  # the title says what these scores are not
    rows = jsonl(batch.stdout)
    wide = query([*S2_FOLDERS, "--target", "s1", "-k", K, "--wide"], ws).stdout
    assert all(r["patch_id"] in wide for r in rows) and str(S2_FOLDERS[0]) in wide


# -- a bad tile among many ------------------------------------------------------------------------
def test_a_bad_tile_is_named_and_skipped_and_the_exit_code_says_so(ws, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from stack_bands import stack

    folder = tmp_path / "tiles"
    for patch in S2_FOLDERS[:3]:
        stack(patch, folder / f"{patch.name}.tif")
    (folder / "broken.tif").write_bytes((folder / f"{S2_FOLDERS[0].name}.tif").read_bytes()[:400])
    proc = query([folder, "--target", "s2", "-k", K, "--format", "jsonl"], ws, check=False)
    assert_clean_error(proc, "1 of 4 queries failed")
    assert len(jsonl(proc.stdout)) == 3 * K  # the other three are written
    skipped = [line for line in proc.stderr.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.tif" in skipped[0]


def test_outputs_are_checked_before_any_work(ws, tmp_path):
    assert_clean_error(query([S2_FOLDERS[0], "-o", tmp_path / "nowhere" / "hits.csv"], ws, check=False), "does not exist")
    assert_clean_error(query([S2_FOLDERS[0], "-o", tmp_path / "hits.txt"], ws, check=False), "hits.txt", "suffix")
    assert_clean_error(query([tmp_path / "missing.tif", *S2_FOLDERS[:2]], ws, check=False), "missing.tif", "no such file")
    assert_clean_error(query([str(tmp_path / "*.tif")], ws, check=False), "no file or folder matches")
    assert_clean_error(query([S2_FOLDERS[0], "--id", S2_FOLDERS[1].name], ws, check=False), "not both")


def test_a_batch_writes_one_mosaic_per_query(ws, tmp_path):
    mosaic = tmp_path / "m.png"
    query([*S2_FOLDERS[:2], "--target", "s1", "-k", 2, "--mosaic", mosaic, "--format", "jsonl"], ws)
    assert (tmp_path / "m-1.png").stat().st_size > 10_000 and (tmp_path / "m-2.png").stat().st_size > 10_000
    assert not mosaic.exists()


# -- the Python API -------------------------------------------------------------------------------
def test_search_with_n_vectors_equals_n_single_searches(archive):
    group = archive.store.open("s2")
    vectors = group["embedding"].isel(patch=[0, 3, 7, 11, 20]).values.astype(np.float32)
    together = archive.search(vectors, "s1", 5)
    alone = [archive.search(v, "s1", 5) for v in vectors]
    assert len(together) == 5
    for many, one in zip(together, alone):
        assert [h.patch_id for h in many] == [h.patch_id for h in one]
        assert np.allclose([h.score for h in many], [h.score for h in one], atol=1e-6)
        assert [h.rank for h in many] == list(range(1, 6))
    excluded = archive.search_many(vectors[:2], "s2", 3, exclude_rows=[0, None])
    assert 0 not in [h.row for h in excluded[0]] and excluded[1][0].row == 3  # a stored patch finds itself first


def test_query_ids_and_dataframes(archive):
    import rsretrieve
    from rsretrieve.errors import StoreError

    ids = [p.name for p in S2_FOLDERS[:4]] + ["no-such-patch"]
    results = archive.query_ids(ids, "s2", K, skip_bad=True)
    assert [r.source for r in results] == ids[:4] and results.failed[0][0] == "no-such-patch"
    assert all(r.source not in [h.patch_id for h in r.hits] for r in results)  # a patch is not its own result
    frame = results.to_dataframe()
    assert list(frame.columns) == COLUMNS and len(frame) == 4 * K
    assert frame["rank"].dtype == np.int64 and frame["score"].dtype == np.float64 and frame["random_init"].all()
    one = results[0].to_dataframe()
    assert len(one) == K and (one["query"] == ids[0]).all()
    assert rsretrieve.results_to_dataframe(results).equals(frame)
    with pytest.raises(StoreError, match="no-such-patch"):
        archive.query_ids(ids, "s2", K)


def test_the_new_names_load_lazily():
    code = ("import sys, rsretrieve; heavy = [m for m in ('torch', 'faiss', 'zarr', 'pandas', 'pyarrow') if m in sys.modules];"
            "print(','.join(heavy)); print(rsretrieve.results_to_dataframe.__module__, rsretrieve.QueryResults.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy, names = proc.stdout.splitlines()
    assert heavy == "" and names == "rsretrieve.retrieval.results QueryResults"
