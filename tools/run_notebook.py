"""Run a notebook top to bottom and save it with its outputs (what `make notebook` does).

    python tools/run_notebook.py notebooks/explore.ipynb [out.ipynb]

Uses nbclient and nbformat (installed by `make`), so no Jupyter server or nbconvert is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def run(source: Path, target: Path) -> Path:
    notebook = nbformat.read(source, as_version=4)
    NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(source.parent)}}).execute()
    nbformat.write(notebook, target)
    return target


if __name__ == "__main__":
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_name(source.stem + ".executed.ipynb")
    print(f"executed {source} -> {run(source, target)}")
