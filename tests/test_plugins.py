"""Datasets and model configs are found through entry points (issue 29, finding 5): a third-party
package installed into a temporary site directory adds a dataset and a model config, and
`rsretrieve index` encodes and indexes with both, without a line of rsretrieve changed."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rsretrieve.datasets import sample_root
from test_cli import RSRETRIEVE, assert_clean_error

PLUGIN = '''
"""A third party's dataset (the bundled BigEarthNet-v2 sample, read under its own name) and model."""
from rsretrieve.datasets import DatasetEntry
from rsretrieve.datasets.benv2 import BENv2Dataset
from rsretrieve.models import CSMoEConfig

ENTRY = DatasetEntry("rsr_plugin:TwinSample", needs_root="give the twin's --data-root",
                     defaults={"source": "tree", "include_snow_cloud": True})
CONFIGS = [CSMoEConfig(name="plugin-tiny", img_size=64, patch_size=16, embed_dim=32, num_heads=2, depth_modality=1,
                       depth_cross=1, num_experts=2, moe_layers_modality=(0,), moe_layers_cross=(0,))]


class TwinSample(BENv2Dataset):
    """BigEarthNet-v2's reader, registered by another package."""
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "rsr-plugin"
version = "0.0.1"

[tool.setuptools]
py-modules = ["rsr_plugin"]

[project.entry-points."rsretrieve.datasets"]
twin = "rsr_plugin:ENTRY"

[project.entry-points."rsretrieve.models"]
plugin = "rsr_plugin:CONFIGS"
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("plugin-src")
    (source / "rsr_plugin.py").write_text(textwrap.dedent(PLUGIN))
    (source / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(source)],
                   check=True, capture_output=True, timeout=300)
    return site


def run_with(site: Path, args, workspace: Path):
    env = {**os.environ, "PYTHONPATH": str(site), "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*RSRETRIEVE, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=workspace)


def test_a_plugin_dataset_and_model_encode_and_index(plugin_site, tmp_path):
    models = run_with(plugin_site, ["models"], tmp_path)
    assert models.returncode == 0 and "plugin-tiny" in models.stdout and "csmoe-tiny" in models.stdout  # the built-ins too
    proc = run_with(plugin_site, ["index", "--dataset", "twin", "--data-root", sample_root(), "--model", "plugin-tiny",
                                  "--modality", "s2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "encoded 24 patches" in proc.stdout and "over 24 vectors" in proc.stdout
    (store,) = (tmp_path / "stores").glob("*.zarr")
    assert "twin" in store.name and "plugin-tiny" in store.name


def test_without_the_plugin_its_names_are_unknown_in_one_line(tmp_path):
    proc = run_with(tmp_path, ["encode", "--dataset", "twin", "--data-root", sample_root()], tmp_path)
    assert_clean_error(proc, "--dataset twin: unknown dataset", "sample", "benv2", "majortom")
