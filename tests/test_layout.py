"""The package as it ships: one import root, the layering contracts, a light `import rsretrieve`.

The wheel is built once; import-linter runs on the unpacked wheel, because `rsretrieve.cli` and
`rsretrieve.indexer` map the top-level folders `cli/` and `indexer/` into the package, which only
an install (not the source tree) shows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 450


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    return next(out.glob("rsretrieve-*.whl"))


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def test_the_wheel_holds_only_rsretrieve_at_top_level(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rsretrieve"}
    for module in ("rsretrieve/cli/__init__.py", "rsretrieve/cli/__main__.py", "rsretrieve/__main__.py",
                   "rsretrieve/indexer/pipeline.py", "rsretrieve/datasets/base.py", "rsretrieve/store/read.py"):
        assert module in names
    # the sample ships as package data, not as namespace packages
    assert any(n.startswith("rsretrieve/data/sample/BigEarthNet-S2/") and n.endswith("_B02.tif") for n in names)
    assert not any(n.startswith("rsretrieve/data/") and n.endswith(".py") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "rsretrieve = rsretrieve.cli:main" in entry_points


def test_import_contracts_hold(unpacked):
    """`lint-imports` with the contracts in pyproject.toml, on the package as installed."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=unpacked,
                          env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and " 0 broken" in proc.stdout


def test_a_reader_importing_the_model_breaks_the_contracts(unpacked, tmp_path):
    """The contracts can fail: a copy of the package where a reader imports `models` is refused."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(unpacked / "rsretrieve", site / "rsretrieve", ignore=shutil.ignore_patterns("data"))
    reader = site / "rsretrieve" / "datasets" / "benv2.py"
    reader.write_text(reader.read_text() + "\nfrom rsretrieve.models import load_model  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=site,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "rsretrieve.datasets.benv2 -> rsretrieve.models" in proc.stdout


def test_import_rsretrieve_is_light_and_offers_the_api():
    code = ("import sys, rsretrieve; heavy = [m for m in ('torch', 'faiss', 'zarr', 'xarray', 'rasterio', 'dask') if m in sys.modules];"
            "print(','.join(heavy)); print(rsretrieve.open_dataset.__module__, rsretrieve.EmbeddingStore.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy, modules = proc.stdout.splitlines()
    assert heavy == ""
    assert modules == "rsretrieve.datasets rsretrieve.store.zarr_store"


def test_python_dash_m_rsretrieve_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "rsretrieve", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Usage" in proc.stdout and "query" in proc.stdout


def _project_modules() -> list[Path]:
    return sorted(p for folder in ("rsretrieve", "indexer", "cli") for p in (REPO / folder).rglob("*.py"))


def test_modules_are_small_and_the_library_root_is_nearly_empty():
    long = {str(p.relative_to(REPO)): n for p in _project_modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
    flat = sorted(p.name for p in (REPO / "rsretrieve").glob("*.py"))
    assert len(flat) <= 11, flat


CYCLES = """
import sys, grimp
graph = grimp.build_graph("rsretrieve")  # every import statement, in function bodies too
cycles = set()
for module in sorted(graph.modules):
    for imported in graph.find_modules_directly_imported_by(module):
        back = graph.find_shortest_chain(importer=imported, imported=module)
        if back:
            cycles.add(" -> ".join([module, *back]))
print(len(graph.modules))
print("\\n".join(sorted(cycles)))
"""


def import_cycles(site: Path) -> tuple[int, list[str]]:
    """(modules, cycles) of the package as installed (`rsretrieve.cli` and `rsretrieve.indexer`
    included), with grimp: imports inside functions count, since they run too."""
    proc = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(site)}, cwd=site)
    assert proc.returncode == 0, proc.stderr
    first, *cycles = proc.stdout.splitlines()
    return int(first), [c for c in cycles if c]


def test_no_import_cycle_between_modules(unpacked):
    n_modules, cycles = import_cycles(unpacked)
    assert cycles == []
    assert n_modules > 80  # the whole package: 65 modules of the library, cli and indexer besides


def test_a_function_level_import_that_closes_a_cycle_is_found(unpacked, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(unpacked, site)
    layout = site / "rsretrieve" / "store" / "layout.py"
    layout.write_text(layout.read_text() + "\n\ndef _late():\n    from rsretrieve.store.zarr_store import EmbeddingStore\n")
    _, cycles = import_cycles(site)
    assert any("rsretrieve.store.layout" in c and "rsretrieve.store.zarr_store" in c for c in cycles), cycles
