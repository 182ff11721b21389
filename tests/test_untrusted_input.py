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
