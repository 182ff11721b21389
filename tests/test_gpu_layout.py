"""The GPU layout of the local cluster (`cluster.gpu_layout`: one encoder worker per GPU, pinned
with CUDA_VISIBLE_DEVICES, and single-threaded reader processes), built here for two GPUs that are
not there and run with the device set to CPU: its wiring is tested on every machine (issue 28)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from rsretrieve.indexer.cluster import ENCODER_RESOURCE, READER_RESOURCE, gpu_layout, local_cluster
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode

MODEL = "csmoe-tiny"
SAMPLE = DatasetSpec("sample", options=(("chunk_size", 4), ("include_snow_cloud", True)))


def test_the_gpu_layout_reads_on_readers_encodes_on_pinned_encoders_and_gives_the_in_process_store(tmp_path):
    import os

    from distributed import Client, LocalCluster, get_task_stream

    layout = gpu_layout(gpus=2, readers=2)
    assert sorted(layout) == ["encoder-0", "encoder-1", "reader-0", "reader-1"]
    path = tmp_path / "gpu-layout.zarr"
    with local_cluster(workers=layout) as cluster, Client(cluster) as client:
        pinned = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        info = client.scheduler_info()["workers"]
        with get_task_stream(client) as stream:
            summary = encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8), client=client)
    assert summary.patches_encoded == 24
    name = {address: w["name"] for address, w in info.items()}
    assert {name[a]: pinned[a] for a in pinned} == {"encoder-0": "0", "encoder-1": "1", "reader-0": None, "reader-1": None}
    ran_on: dict[str, set] = {}
    for task in stream.data:
        ran_on.setdefault(task["key"].split("-")[0], set()).add(name[task["worker"]])
    assert ran_on["read"] and all(READER_RESOURCE in info_of(info, w) for w in ran_on["read"])
    assert ran_on["encode"] and all(w.startswith("encoder-") for w in ran_on["encode"])
    assert all(ENCODER_RESOURCE in info_of(info, w) for w in ran_on["encode"])

    reference = tmp_path / "in-process.zarr"
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address="127.0.0.1:0") as c, Client(c) as client:
        encode(SAMPLE, "s2", reference, EncoderSpec(MODEL, "cpu", 8), client=client)
    a, b = xr.open_zarr(path, group="s2"), xr.open_zarr(reference, group="s2")
    assert a["patch_id"].values.tolist() == b["patch_id"].values.tolist()
    np.testing.assert_allclose(a["embedding"].values, b["embedding"].values, rtol=1e-5, atol=1e-6)


def info_of(info: dict, worker_name: str) -> dict:
    return next(w["resources"] for w in info.values() if w["name"] == worker_name)
