"""The encoder stage on real multi-process clusters: reader workers apart from the encoder worker,
a reader killed mid-run, LMDB chunks read concurrently, batching across chunks."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
import xarray as xr

from rsretrieve.indexer.batching import groups, groups_in_flight
from rsretrieve.indexer.cluster import ENCODER_RESOURCE, READER_RESOURCE, local_layout, task_resources
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode

MODEL = "csmoe-tiny"
SAMPLE = DatasetSpec("sample", options=(("chunk_size", 4), ("include_snow_cloud", True)))  # 6 chunks per modality
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks below travel to worker processes


def spec_cluster(readers: int = 2):
    """A scheduler, `readers` reader workers and one encoder worker, each a process, on 127.0.0.1."""
    from distributed import Nanny, Scheduler, SpecCluster

    def worker(resources: dict) -> dict:
        return {"cls": Nanny, "options": {"nthreads": 1, "resources": resources, "host": "127.0.0.1"}}

    workers = {"encoder": worker({ENCODER_RESOURCE: 1})}
    workers.update({f"reader-{i}": worker({READER_RESOURCE: 1}) for i in range(readers)})
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1"}}
    return SpecCluster(workers=workers, scheduler=scheduler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same encode on the single-process path: one in-process worker."""
    from distributed import Client, LocalCluster

    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        for modality in ("s1", "s2"):
            encode(SAMPLE, modality, path, EncoderSpec(MODEL, "cpu", 8), client=client)
    return path


def assert_same_store(a: Path, b: Path) -> None:
    for modality in ("s1", "s2"):
        x, y = xr.open_zarr(a, group=modality), xr.open_zarr(b, group=modality)
        assert x["patch_id"].values.tolist() == y["patch_id"].values.tolist()
        np.testing.assert_array_equal(x["valid"].values, y["valid"].values)
        np.testing.assert_allclose(x["embedding"].values, y["embedding"].values, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x["lat"].values, y["lat"].values)
        assert bool(x["chunk_done"].all()) and bool(y["chunk_done"].all())


def test_readers_and_encoder_in_separate_processes_give_the_single_process_store(tmp_path, reference):
    from distributed import Client, get_task_stream

    path = tmp_path / "multi.zarr"
    with spec_cluster() as cluster, Client(cluster) as client:
        assert task_resources(client) == ({READER_RESOURCE: 1}, {ENCODER_RESOURCE: 1})
        with get_task_stream(client) as stream:
            for modality in ("s1", "s2"):
                encode(SAMPLE, modality, path, EncoderSpec(MODEL, "cpu", 8), client=client)
        workers = {name: info["resources"] for name, info in client.scheduler_info()["workers"].items()}
    ran_on = {}
    for task in stream.data:
        ran_on.setdefault(task["key"].split("-")[0], set()).add(task["worker"])
    assert all(READER_RESOURCE in workers[w] for w in ran_on["read"]) and len(ran_on["read"]) == 2
    assert all(ENCODER_RESOURCE in workers[w] for w in ran_on["encode"])
    assert_same_store(path, reference)


def kill_the_reader_once(chunk) -> None:
    """Read hook: the worker reading the third S2 chunk dies (SIGKILL) the first time."""
    marker = Path(os.environ["RSRETRIEVE_TEST_MARKER"])
    if chunk.modality == "s2" and chunk.key.endswith("000002") and not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_reader_killed_mid_run_the_run_completes_and_the_store_is_identical(tmp_path, reference, monkeypatch):
    from distributed import Client

    marker = tmp_path / "killed"
    monkeypatch.setenv("RSRETRIEVE_TEST_MARKER", str(marker))  # inherited by the workers' processes
    path = tmp_path / "killed.zarr"
    with spec_cluster() as cluster, Client(cluster) as client:
        for modality in ("s1", "s2"):
            encode(SAMPLE, modality, path, EncoderSpec(MODEL, "cpu", 8), client=client, read_hook=kill_the_reader_once)
    assert marker.exists()  # a reader really died
    assert_same_store(path, reference)


def test_lmdb_chunks_read_at_once_by_the_threads_of_one_worker(lmdb_root, tmp_path):
    """Several LMDB chunks in flight in one process (the old reader failed with 'already open')."""
    from distributed import Client, LocalCluster

    spec = DatasetSpec("benv2", str(lmdb_root), options=(("chunk_size", 3), ("include_snow_cloud", True)))
    serial = spec.open()
    chunks = serial.chunks("s2")
    assert len(chunks) >= 6
    with LocalCluster(n_workers=1, threads_per_worker=6, processes=True, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        from rsretrieve.indexer.readers import read_chunk

        batches = client.gather([client.submit(read_chunk, spec, chunk, pure=False) for chunk in chunks])
    for chunk, batch in zip(chunks, batches):
        expect = serial.read_chunk(chunk)
        assert batch.patch_ids == expect.patch_ids and not batch.skipped
        np.testing.assert_array_equal(batch.pixels.fine, expect.pixels.fine)


def test_chunks_are_grouped_to_a_full_batch_and_in_flight_follows_the_read_slots():
    assert groups(list("abcdef"), [4, 4, 4, 4, 4, 4], 8) == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert groups(list("abc"), [100, 100, 100], 32) == [["a"], ["b"], ["c"]]
    assert groups(list("abc"), [5, 5, 5], 512) == [["a", "b", "c"]]
    # 14 read slots, one GPU, 4 chunks per group: 7 groups keep every reader busy twice over
    assert groups_in_flight(14, 1, 4, 1024) == 7
    # a small memory budget caps it
    assert groups_in_flight(14, 1, 4, 1024, budget=2 * 1024 * 300_000) == 2


def test_local_layout_without_a_gpu_follows_the_models_cost():
    from rsretrieve.indexer.jobs import is_small_model

    assert is_small_model("csmoe-tiny") and not is_small_model("csmoe-p16") and not is_small_model("csmae-p15")
    assert not is_small_model("/no/such/checkpoint.ckpt")
    small = local_layout("cpu", readers=3, small_model=True)  # each core reads and encodes
    assert len(small) == 3
    for spec in small.values():
        assert spec["options"]["resources"] == {READER_RESOURCE: 1, ENCODER_RESOURCE: 1}
        assert spec["options"]["nthreads"] == 1 and spec["options"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    (large,) = local_layout("cpu", readers=3).values()  # one model on every core, reads in its threads
    assert large["options"]["resources"] == {READER_RESOURCE: 3, ENCODER_RESOURCE: 1} and large["options"]["nthreads"] == 4


def test_bf16_weights_agree_with_float32():
    """CUDA runs bf16 weights (`to_inference_dtype`); the same cast on the CPU agrees with fp32."""
    from rsretrieve.datasets import open_dataset
    from rsretrieve.models import create_model, embed_raw
    from rsretrieve.models.csmoe import to_inference_dtype

    raw = open_dataset("sample").read_chunk(open_dataset("sample").chunks("s2")[0]).pixels
    fp32 = embed_raw(create_model(MODEL), raw, "s2", "cpu")
    bf16_model = to_inference_dtype(create_model(MODEL), "bf16", "cpu")
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    bf16 = embed_raw(bf16_model, raw, "s2", "cpu")
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(fp32, bf16)


def test_an_lmdb_opened_in_a_parent_is_read_by_forked_children(lmdb_root):
    """A process pool forked after its parent read the LMDB (the children inherit the open
    environment, which LMDB forbids them to use and py-lmdb to open again)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rsretrieve.datasets import open_dataset

    ds = open_dataset("benv2", lmdb_root, include_snow_cloud=True, chunk_size=6)
    chunks = ds.chunks("s1")
    expect = [len(ds.read_chunk(c)) for c in chunks]  # the parent opens the environment
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        assert list(pool.map(ds.read_chunk, chunks)) and [len(b) for b in pool.map(ds.read_chunk, chunks)] == expect
