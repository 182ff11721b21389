"""Device, batch size and compute precision are resolved where the model runs (issue 28, defects 1
and 3): a client without CUDA drives workers, `--device cuda` on workers without CUDA names them,
and a store keeps the precision it was encoded at, for resumes and queries alike."""

from __future__ import annotations

import pytest

from rsretrieve.datasets import sample_root
from rsretrieve.errors import RSRetrieveError, StoreError
from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
from test_cli import RSRETRIEVE, assert_clean_error

MODEL = "csmoe-tiny"
SAMPLE = DatasetSpec("sample", options=(("chunk_size", 4), ("include_snow_cloud", True)))


@pytest.fixture(scope="module")
def cluster():
    """A loopback cluster of worker processes: what the client process patches, they do not see."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, resources={"encoder": 1}, processes=True, dashboard_address=None,
                      host="127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    from distributed import Client

    with Client(cluster) as c:
        yield c


def test_device_cuda_on_workers_without_cuda_fails_in_one_line_naming_them(client, tmp_path):
    """From a client without CUDA, no batch size given: the client resolves nothing itself (it used
    to fail with 'no CUDA device ... on this machine'); the encoder workers are asked and named."""
    worker = next(iter(client.scheduler_info()["workers"]))
    with pytest.raises(RSRetrieveError) as caught:
        encode(SAMPLE, "s2", tmp_path / "cuda.zarr", EncoderSpec(MODEL, "cuda"), client=client)
    message = str(caught.value)
    assert "\n" not in message and "this machine" not in message
    assert worker in message and "no CUDA device" in message and "--device cpu" in message


def test_the_cli_says_it_in_one_line_over_a_scheduler(cluster, tmp_path):
    import os
    import subprocess

    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(tmp_path / "ws"), "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*RSRETRIEVE, "encode", "--model", MODEL, "--modality", "s2", "--device", "cuda",
                           "--scheduler", cluster.scheduler_address], capture_output=True, text=True, env=env, timeout=600)
    assert_clean_error(proc, "encoder worker(s)", "tcp://127.0.0.1:", "no CUDA device")


def test_the_client_never_resolves_the_encoders_device(client, tmp_path, monkeypatch):
    """A client whose own device resolution would fail still runs the encode: batch size and
    precision come from the workers (32 and float32 on their CPUs)."""
    from rsretrieve.store import EmbeddingStore

    def not_here(self):
        raise AssertionError("the client resolved the encoder's device")

    monkeypatch.setattr(EncoderSpec, "resolved_device", not_here)
    summary = encode(SAMPLE, "s1", tmp_path / "auto.zarr", EncoderSpec(MODEL, "cpu"), client=client)
    assert summary.patches_encoded == 24
    assert EmbeddingStore(tmp_path / "auto.zarr").provenance("s1")["precision"] == "float32"


def test_a_bfloat16_archive_finds_its_own_patch_first_and_a_float32_resume_is_refused(client, tmp_path):
    from rsretrieve.retrieval.archive import Archive
    from rsretrieve.retrieval.faiss_index import EmbeddingIndex
    from rsretrieve.retrieval.index_meta import index_dir
    from rsretrieve.store import EmbeddingStore

    path = tmp_path / "bf16.zarr"
    encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8, precision="bfloat16"), client=client)
    store = EmbeddingStore(path)
    assert store.provenance("s2")["precision"] == "bfloat16"
    index = EmbeddingIndex.build(store.open("s2", index=False), "s2", kind="flat", use_gpu=False, store_path=path)
    index.save(index_dir(tmp_path / "indexes", path, store.store_id, "s2"), store_id=store.store_id)

    archive = Archive.open(path, tmp_path / "indexes")
    folders = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())[:3]
    for folder in folders:
        hit = archive.query_tile(folder, "s2", k=3).hits[0]
        # >= 0.9999 is the bar; a float32 query of this tiny model still scores ~0.99998, so
        # only the archive's own precision reaches 1 - 5e-6 (the same bf16 arithmetic as the encoder's)
        assert hit.patch_id == folder.name and hit.score >= 1 - 5e-6, (folder.name, hit)
    assert str(next(archive._model.parameters()).dtype) == "torch.bfloat16"  # the query embedded as the archive did

    with pytest.raises(StoreError, match=r"computed in bfloat16, not float32: .* pass --precision bfloat16") as caught:
        encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8, precision="float32"), client=client)
    assert "\n" not in str(caught.value)
    again = encode(SAMPLE, "s2", path, EncoderSpec(MODEL, "cpu", 8), client=client)  # auto: the store's precision
    assert again.nothing_to_do and again.provenance["precision"] == "bfloat16"


def test_stores_written_before_precision_was_recorded_are_float32():
    from rsretrieve.provenance import differences

    old = {"model": MODEL, "dtype": "float32"}
    assert differences(old, {**old, "precision": "float32"}) == []
    assert differences(old, {**old, "precision": "bfloat16"}) == ["precision"]
