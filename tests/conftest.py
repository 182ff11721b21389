"""Fixtures shared by several test modules."""

import os
import random
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from safetensors.numpy import save

from rsretrieve.datasets import sample_root
from rsretrieve.datasets.benv2 import band_path

ROOT = sample_root()
WHEEL_LMDB = Path("/tmp/wheels/cfg/configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB")
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
# Every test starts from the same global random state (Python's, NumPy's and torch's), whatever ran
# before it: a test that draws from them without a seed of its own still draws the same numbers.
# The seed is printed at the end of every run; RSRETRIEVE_TEST_SEED=N reruns with another one.
SEED = int(os.environ.get("RSRETRIEVE_TEST_SEED", "0"))


def pytest_terminal_summary(terminalreporter):  # printed under -q too, unlike the header
    terminalreporter.write_line(f"random seed of every test: {SEED} (RSRETRIEVE_TEST_SEED={SEED} reproduces this run)")


@pytest.fixture(autouse=True)
def seeded_random_state():
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # torch's own start seed differs from process to process


@pytest.fixture(scope="session")
def lmdb_root(tmp_path_factory):
    """A rico-hdl LMDB next to metadata parquets: the wheel's original one when it is on this
    machine, else one encoded from the bundled tree."""
    root = tmp_path_factory.mktemp("benv2_lmdb")
    for f in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        shutil.copy(ROOT / f, root / f)
    if (WHEEL_LMDB / "data.mdb").exists():
        shutil.copytree(WHEEL_LMDB, root / "BigEarthNet-V2-LMDB")
        return root
    rows = pq.read_table(ROOT / "metadata.parquet").to_pylist()
    rows += pq.read_table(ROOT / "metadata_for_patches_with_snow_cloud_or_shadow.parquet").to_pylist()
    env = lmdb.open(str(root / "BigEarthNet-V2-LMDB"), map_size=1 << 27)
    with env.begin(write=True) as txn:
        for r in rows:
            for name, mod, bands in ((r["patch_id"], "s2", S2_ALL), (r["s1_name"], "s1", ("VV", "VH"))):
                arrs = {}
                for b in bands:
                    with rasterio.open(band_path(ROOT, name, mod, b)) as ds:
                        arrs[b] = ds.read(1)
                txn.put(name.encode(), save(arrs))
    env.close()
    return root


@pytest.fixture(scope="module")
def client():
    """A thread-based Dask client for encoding sample stores in-process (one per test module)."""
    from distributed import Client

    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as c:
        yield c
