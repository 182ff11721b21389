"""Resumability and retries of the encoder stage: kill -9 at each chunk in turn, then resume; patches
skipped for a bad file are read again once it is fixed (`retry_skipped`)."""

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from rsretrieve.datasets import sample_root
from rsretrieve.datasets.benv2 import band_path
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode

MODEL = "csmoe-tiny"
CHUNKS = (("chunk_size", 3), ("include_snow_cloud", True))  # the sample's 24 patches in 8 chunks

# one encode in one process (threads, no worker processes): SIGKILL takes all of it at once
ENCODE = textwrap.dedent("""
    import os, signal, sys
    from distributed import Client
    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
    store, kill_at = sys.argv[1], int(sys.argv[2])
    def maybe_die(chunk):  # chunk keys end in their number: s1 chunks are 0-7, s2 chunks 8-15
        position = int(chunk.key.rsplit(":", 1)[1]) + (8 if ":s2:" in chunk.key else 0)
        if position == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # mid-run: the driver may be writing the previous chunk
    with Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        for modality in ("s1", "s2"):
            encode(DatasetSpec("sample", options={chunks!r}), modality, store, EncoderSpec("{model}", "cpu", 3),
                   client=client, chunk_hook=maybe_die)
""").format(chunks=CHUNKS, model=MODEL)


def run_encode(store, kill_at=-1):
    return subprocess.run([sys.executable, "-c", ENCODE, str(store), str(kill_at)], capture_output=True, text=True, timeout=600)


def arrays(store) -> dict:
    out = {}
    for modality in ("s1", "s2"):
        group = zarr.open_group(store / modality, mode="r")
        for name, array in group.arrays():
            out[f"{modality}/{name}"] = array[:]
    return out


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("clean") / "store.zarr"
    proc = run_encode(store)
    assert proc.returncode == 0, proc.stderr
    return store


# Every chunk position, each a test of its own (no random choice: a failure names its position and
# reruns as `-k "kill_9 and chunk07"`): 0 before anything is written, 7 the last S1 chunk,
# 8 the first S2 chunk after the S1 group is complete, 15 the last chunk of the run.
@pytest.mark.parametrize("kill_at", range(16), ids=lambda position: f"chunk{position:02d}")
def test_kill_9_at_each_chunk_then_resume_equals_a_clean_run(clean_store, tmp_path, kill_at):
    store = tmp_path / "killed.zarr"
    killed = run_encode(store, kill_at)
    assert killed.returncode == -9, f"killed before chunk {kill_at + 1}: {killed.stderr[-2000:]}"
    resumed = run_encode(store)
    assert resumed.returncode == 0, f"killed before chunk {kill_at + 1}: {resumed.stderr[-2000:]}"
    clean, got = arrays(clean_store), arrays(store)
    assert clean.keys() == got.keys()
    for name in clean:
        a, b = clean[name], got[name]
        same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b)
        assert same, f"killed before chunk {kill_at + 1}: {name} differs"


def test_retry_skipped_reads_a_fixed_file_again(tmp_path):
    root = tmp_path / "benv2"
    shutil.copytree(sample_root(), root, ignore=shutil.ignore_patterns("majortom"))
    import pyarrow.parquet as pq

    name = pq.read_table(root / "metadata.parquet")["patch_id"][0].as_py()
    band = band_path(root, name, "s2", "B04")
    good = band.read_bytes()
    band.write_bytes(good[:200])  # a truncated GeoTIFF: the patch is skipped
    spec, store = DatasetSpec("benv2", str(root), None, (("include_snow_cloud", True),)), tmp_path / "s.zarr"
    encoder = EncoderSpec(MODEL, "cpu", 8)
    with __import__("distributed").Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        first = encode(spec, "s2", store, encoder, client=client)
        assert len(first.skipped) == 1 and name in first.skipped[0][0]
        band.write_bytes(good)  # fixed
        assert encode(spec, "s2", store, encoder, client=client).nothing_to_do  # not retried unless asked
        retried = encode(spec, "s2", store, encoder, client=client, retry_skipped=True)
    assert retried.patches_encoded > 0 and not retried.skipped
    group = zarr.open_group(store / "s2", mode="r")
    assert bool(group["valid"][:].all())
    assert "skipped" not in group.attrs
