"""Footprints of queries and results: GeoJSON polygons that validate and hold their patch centres,
and `rsretrieve query --html`: one self-contained map page, opened in a real (headless) Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from rasterio.warp import transform, transform_bounds

from rsretrieve.datasets import sample_root
from test_cli import assert_clean_error, indexed_workspace, run, sample_patch_folder

K = 4
S2_FOLDERS = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())
BATCH = [S2_FOLDERS[0], S2_FOLDERS[20], S2_FOLDERS[22]]  # Austria (a cluster of neighbours), Austria (apart), Finland
SCREENSHOT_COPY = Path("/tmp/rsretrieve_map.png")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return indexed_workspace(tmp_path_factory.mktemp("map"))


@pytest.fixture(scope="module")
def centres(ws) -> dict[str, tuple[float, float]]:
    """{patch id: (lat, lon)} of every stored patch, S1 and S2, as the store holds them."""
    from rsretrieve.store.zarr_store import EmbeddingStore

    store = EmbeddingStore(next((ws / "stores").glob("*.zarr")))
    found = {}
    for modality in ("s1", "s2"):
        group = store.open(modality)
        found.update(zip(group["patch_id"].values.tolist(), zip(group["lat"].values.tolist(), group["lon"].values.tolist())))
    return found


@pytest.fixture(scope="module")
def page(ws, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A 3-query batch of patch folders, top 4, as a map page (and JSON Lines of the same results)."""
    out = tmp_path_factory.mktemp("page") / "page.html"
    proc = run(["query", *BATCH, "--target", "s2", "-k", K, "--html", out, "--format", "jsonl"], ws)
    assert f"map page of 3 queries written to {out}" in proc.stderr
    return out, [json.loads(line) for line in proc.stdout.splitlines()]


def geojson(args, ws) -> dict:
    """`rsretrieve query ... --format geojson`, checked by geojson-pydantic (RFC 7946 types)."""
    from geojson_pydantic import FeatureCollection

    data = json.loads(run(["query", *args, "--format", "geojson"], ws).stdout)
    FeatureCollection.model_validate(data)
    return data


def assert_right_hand(geometry: dict) -> shapely.Geometry:
    """A Polygon (or MultiPolygon) whose exterior rings run counterclockwise, holes clockwise."""
    shape = shapely.geometry.shape(geometry)
    assert shape.is_valid and shape.geom_type in ("Polygon", "MultiPolygon")
    for polygon in getattr(shape, "geoms", [shape]):
        assert polygon.exterior.is_ccw and not any(ring.is_ccw for ring in polygon.interiors)
    return shape


def assert_results_hold_their_centres(data: dict, centres: dict, k: int) -> None:
    results = [f for f in data["features"] if f["properties"]["role"] == "result"]
    assert len(results) == k * len(data["properties"]["queries"])
    for feature in results:
        props = feature["properties"]
        assert {"query", "rank", "score", "patch_id", "pair_id", "labels", "split", "random_init"} <= set(props)
        assert props["random_init"] is True and feature["geometry"]["type"] == "Polygon"
        lat, lon = centres[props["patch_id"]]
        shape = assert_right_hand(feature["geometry"])
        assert shape.contains(shapely.Point(lon, lat)), props["patch_id"]
        assert (props["lat"], props["lon"]) == pytest.approx((lat, lon))
        w, s, e, n = shape.bounds  # a 1,200 m square: about 0.011 degrees of latitude
        assert 0.0105 < n - s < 0.0112 and 0.01 < e - w < 0.04


# -- GeoJSON ---------------------------------------------------------------------------------------
def test_geojson_of_queries_by_id_holds_query_and_result_footprints(ws, centres):
    ids = [S2_FOLDERS[3].name, S2_FOLDERS[22].name]
    data = geojson(["--id", ids[0], "--id", ids[1], "--target", "s1", "-k", 3], ws)
    assert data["type"] == "FeatureCollection" and data["properties"]["random_init"] is True
    queries = [f for f in data["features"] if f["properties"]["role"] == "query"]
    assert [f["properties"]["query"] for f in queries] == ids
    for feature in queries:
        assert feature["properties"]["modality"] == "s2" and feature["properties"]["query_kind"] == "id"
        lat, lon = centres[feature["properties"]["query"]]
        assert assert_right_hand(feature["geometry"]).contains(shapely.Point(lon, lat))
    assert_results_hold_their_centres(data, centres, 3)
    # each query's feature comes first, then its results in rank order
    roles = [(f["properties"]["role"], f["properties"].get("rank")) for f in data["features"]]
    assert roles == [("query", None), ("result", 1), ("result", 2), ("result", 3)] * 2


def test_geojson_of_tiles_outlines_each_tile_in_wgs84(ws, centres):
    data = geojson([*BATCH, "--target", "s1", "-k", 2], ws)
    queries = [f for f in data["features"] if f["properties"]["role"] == "query"]
    assert [f["properties"]["query"] for f in queries] == [str(p) for p in BATCH]
    for folder, feature in zip(BATCH, queries):
        assert feature["properties"]["modality"] == "s2" and feature["properties"]["query_kind"] == "tile"
        shape = assert_right_hand(feature["geometry"])
        lat, lon = centres[folder.name]  # the folder is an archive patch too: the store knows its centre
        assert shape.contains(shapely.Point(lon, lat))
        with rasterio.open(folder / f"{folder.name}_B02.tif") as ds:
            expected = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        assert np.allclose(shape.bounds, expected, atol=1e-6)  # the raster's own bounds, to about 10 cm
    assert_results_hold_their_centres(data, centres, 2)


def test_a_southern_hemisphere_tile_and_hit(ws, tmp_path):
    """A GeoTIFF placed in UTM 56 south (EPSG:32756): its outline lies south of the equator, runs
    counterclockwise and matches the raster's bounds; a hit in MGRS tile 56HLH gets its square there."""
    from geojson_pydantic import FeatureCollection

    from rsretrieve.retrieval.results import Hit, QueryResult, results_geojson

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from stack_bands import stack

    tile = stack(S2_FOLDERS[0], tmp_path / "south.tif")
    with rasterio.open(tile, "r+") as ds:
        ds.crs = "EPSG:32756"
        bounds, centre = ds.bounds, ds.xy(ds.height / 2, ds.width / 2)
    data = geojson([tile, "--target", "s2", "-k", 1], ws)
    query = next(f for f in data["features"] if f["properties"]["role"] == "query")
    shape = assert_right_hand(query["geometry"])
    (lon,), (lat,) = transform("EPSG:32756", "EPSG:4326", [centre[0]], [centre[1]])
    assert lat < -40 and shape.contains(shapely.Point(lon, lat))
    assert np.allclose(shape.bounds, transform_bounds("EPSG:32756", "EPSG:4326", *bounds), atol=1e-6)

    hit = Hit(1, "S2A_MSIL2A_20200101T000000_N9999_R000_T56HLH_10_10", "", 0.5, [], "test", -33.87, 151.2, 0)
    south = results_geojson([QueryResult("q", "s2", "s2", [hit], {"model": "x", "random_init": True})])
    FeatureCollection.model_validate(south)
    assert south["features"][0]["geometry"] is None  # a query without a footprint: null geometry
    assert assert_right_hand(south["features"][1]["geometry"]).contains(shapely.Point(151.2, -33.87))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # on purpose
def test_a_tile_without_georeference_has_a_null_footprint(ws, tmp_path):
    tile = tmp_path / "plain.tif"
    pixels = np.random.default_rng(0).integers(200, 3000, (10, 120, 120), dtype=np.uint16)
    with rasterio.open(tile, "w", driver="GTiff", width=120, height=120, count=10, dtype="uint16") as ds:
        ds.write(pixels)
    page = tmp_path / "plain.html"
    data = geojson([tile, "--target", "s2", "-k", 2, "--html", page], ws)
    assert data["features"][0]["properties"]["role"] == "query" and data["features"][0]["geometry"] is None
    assert all(f["geometry"]["type"] == "Polygon" for f in data["features"][1:])
    text = page.read_text()  # the results are mapped all the same, and the page says what is missing
    assert 'data-role="query"' not in text and text.count('data-role="result"') == 2 and "Not georeferenced: Q" in text


def test_geoparquet_keeps_points_and_csv_its_columns(ws, tmp_path):
    import pyarrow.parquet as pq

    run(["query", *BATCH[:2], "--target", "s1", "-k", 2, "-o", tmp_path / "hits.parquet"], ws)
    geo = json.loads(pq.read_schema(tmp_path / "hits.parquet").metadata[b"geo"])
    assert geo["columns"]["geometry"]["geometry_types"] == ["Point"]
    header = run(["query", *BATCH[:2], "--target", "s1", "-k", 2, "--format", "csv"], ws).stdout.splitlines()[0]
    assert header == "query,query_modality,target,rank,patch_id,pair_id,score,labels,split,lat,lon,random_init"


# -- the map page ----------------------------------------------------------------------------------
def chromium() -> str:
    """A Chromium to drive: Debian's, another on the PATH, or playwright's own build."""
    for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if path and Path(path).exists():
            return path
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            if Path(p.chromium.executable_path).exists():
                return p.chromium.executable_path
    except Exception:
        pass
    pytest.skip("no Chromium: neither /usr/bin/chromium nor another chromium (PATH, playwright's own) was found")


def test_the_page_is_self_contained(page):
    path, _ = page
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    urls = set(re.findall(r"""(?:https?|ftp)://[^\s"'<>)]+""", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, not a fetch
    sources = re.findall(r"""\b(?:src|href)="([^"]*)\"""", text)
    assert sources and all(s.startswith("data:") for s in sources)
    assert "default-src 'none'" in text  # and the page forbids itself every fetch


def test_the_page_in_headless_chromium(page, tmp_path):
    from playwright.sync_api import sync_playwright

    path, rows = page
    executable = chromium()
    messages, errors, requests = [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        tab.on("console", lambda m: messages.append((m.type, m.text)))
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.on("request", lambda r: requests.append(r.url))
        tab.goto(path.as_uri())
        tab.wait_for_load_state("load")
        count = lambda selector: tab.locator(selector).count()  # noqa: E731
        assert count("section.query-section") == 3
        assert count("svg [data-role=query]") == 3 and count("svg [data-role=result]") == 3 * K
        for n in (1, 2, 3):
            section = f"#query-{n}"
            assert count(f"{section} svg [data-role=query]") == 1
            assert tab.eval_on_selector_all(f"{section} svg [data-role=result]", "els => els.map(e => +e.dataset.rank).sort()") == [1, 2, 3, 4]
        assert count("img.thumb") == 15
        assert tab.eval_on_selector_all("img.thumb", "imgs => imgs.every(i => i.complete && i.naturalWidth === 120)")
        banner = tab.locator(".random-banner")
        assert banner.is_visible() and "RANDOM WEIGHTS: these scores are not results" in banner.inner_text()
        # the cards name the hits the command printed, in rank order
        shown = tab.eval_on_selector_all(".query-section .card:not(.q) .id", "els => els.map(e => e.textContent)")
        assert shown == [r["patch_id"] for r in rows]
        # hovering a card lights its footprint (the page's script runs)
        card = tab.locator("#query-1 .card:not(.q)").first
        key = card.get_attribute("data-key")
        card.hover()
        assert "hl" in tab.locator(f'#query-1 svg [data-role=result][data-key="{key}"]').get_attribute("class").split()
        shot = tmp_path / "map.png"
        tab.screenshot(path=str(shot), full_page=True)
        browser.close()
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert shot.stat().st_size > 50_000
    assert not [m for m in messages if m[0] == "error"], messages
    assert not errors, errors
    assert requests == [path.as_uri()], requests  # the page itself, nothing else


def test_the_page_is_valid_html5(page):
    """The Nu Html Checker (vnu.jar, what validator.w3.org runs), when this machine has it: set
    VNU_JAR, or have `vnu` on the PATH."""
    path, _ = page
    jar = os.environ.get("VNU_JAR")
    if jar and Path(jar).is_file() and shutil.which("java"):
        command = ["java", "-jar", jar]
    elif shutil.which("vnu"):
        command = [shutil.which("vnu")]
    else:
        pytest.skip("no Nu Html Checker: set VNU_JAR to vnu.jar (npm package vnu-jar) or put vnu on the PATH")
    proc = subprocess.run([*command, "--errors-only", "--also-check-svg", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_html_output_is_checked_before_any_work(ws, tmp_path):
    proc = run(["query", BATCH[0], "--html", tmp_path / "nowhere" / "page.html"], ws, check=False)
    assert_clean_error(proc, "does not exist")
    assert "RANDOM WEIGHTS" not in proc.stderr  # failed before the archive was opened
    assert_clean_error(run(["query", BATCH[0], "--html", tmp_path], ws, check=False), "is a folder")


def test_a_page_of_archive_patches_across_modalities(ws, tmp_path):
    out = tmp_path / "ids.html"
    run(["query", "--id", sample_patch_folder("s1", 2).name, "--target", "s2", "-k", 2, "--html", out], ws)
    text = out.read_text()
    assert text.count('data-role="query"') == 1 and text.count('data-role="result"') == 2
    assert text.count('class="thumb"') == 3 and "S1 archive patch" in text


# -- the page from plain data ------------------------------------------------------------------------
def square(lon, lat, size=0.01):
    return {"type": "Polygon", "coordinates": [[[lon, lat], [lon + size, lat], [lon + size, lat + size], [lon, lat + size], [lon, lat]]]}


def test_render_map_page_without_and_across_the_antimeridian():
    from rsretrieve.export.map_page import png_bytes, render_map_page

    png = png_bytes(np.zeros((120, 120, 3), np.uint8))
    hit = {"rank": 1, "score": 0.5, "patch_id": "p", "pair_id": "", "labels": [], "split": "test", "png": png}
    across = {"type": "MultiPolygon", "coordinates": [[[[179.995, -16.0], [180.0, -16.0], [180.0, -15.99], [179.995, -15.99], [179.995, -16.0]]],
                                                      [[[-180.0, -16.0], [-179.995, -16.0], [-179.995, -15.99], [-180.0, -15.99], [-180.0, -16.0]]]]}
    base = {"title": "t", "query": "q.tif", "kind": "tile", "modality": "s2", "target": "s2", "query_png": png}
    nowhere = {**base, "query_geometry": None, "hits": [{**hit, "geometry": None}]}
    fiji = {**base, "query_geometry": square(179.99, -16.0), "hits": [{**hit, "geometry": across}]}
    text = render_map_page({"title": "t", "random_init": False, "model": "m", "checkpoint": "w.safetensors", "sections": [nowhere, fiji]})
    assert "No footprint to map" in text and "RANDOM WEIGHTS" not in text
    paths = re.findall(r' d="([^"]+)"', text)
    assert paths and all(re.fullmatch(r"[MLVHZ0-9., -]+", d) for d in paths)  # numbers only: no nan, no inf
    coordinates = [float(v) for d in paths for v in re.findall(r"-?\d+\.?\d*", d)]
    assert max(map(abs, coordinates)) < 2000  # the cut square drawn whole, beside the query, not a world apart
    assert re.search(r">180\.0*°<", text) and "°E<" in text and "°W<" in text  # meridians both sides of 180, which has no E or W
