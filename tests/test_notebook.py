"""The notebook runs top to bottom on the bundled sample and shows a real mosaic."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_notebook_runs_and_shows_the_mosaic(tmp_path, monkeypatch):
    monkeypatch.setenv("RSRETRIEVE_WORKSPACE", str(tmp_path / "ws"))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the mosaic is displayed"
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "RANDOM WEIGHTS" in text and "s2: 24 newly encoded" in text
    assert (tmp_path / "ws" / "notebook-mosaic.png").stat().st_size > 10_000
