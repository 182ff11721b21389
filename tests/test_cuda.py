"""Tests that need CUDA (marker `cuda`; skipped without it; `make gpu-check` runs them on a lent
GPU machine): the GPU path of issue 28 against the CPU's float32 results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SAMPLE_OPTIONS = (("chunk_size", 4), ("include_snow_cloud", True))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def sample_raw(modality: str):
    from rsretrieve.datasets import open_dataset
    from rsretrieve.pixels import RawPixels

    ds = open_dataset("sample", include_snow_cloud=True)
    return RawPixels.concat([ds.read_chunk(c).pixels for c in ds.chunks(modality)])


def registered_models() -> list[str]:
    from rsretrieve.models.registry import list_models

    return list(list_models())


@pytest.mark.parametrize("name", registered_models())
@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_cuda_bfloat16_embeddings_match_cpu_float32(name, modality):
    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.models.csmoe import to_inference_dtype
    from rsretrieve.models.inference import embed_raw

    raw = sample_raw(modality)
    cpu = embed_raw(load_model(name), raw, modality, "cpu", 8)
    gpu = embed_raw(to_inference_dtype(load_model(name, device="cuda"), "auto", "cuda"), raw, modality, "cuda", 8)
    assert cosines(cpu, gpu).min() >= 0.999


def test_the_side_stream_copy_gives_the_one_batch_result():
    """Many batches (copied on the side stream while the model runs) equal one batch."""
    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.models.inference import embed_raw

    raw = sample_raw("s2")
    model = load_model("csmoe-tiny", device="cuda")
    many = embed_raw(model, raw, "s2", "cuda", 3)
    one = embed_raw(model, raw, "s2", "cuda", len(raw))
    assert cosines(many, one).min() >= 0.9999


def test_a_compiled_cuda_run_compiles_once_per_modality():
    from torch._dynamo.utils import counters

    from rsretrieve.datasets import open_dataset
    from rsretrieve.indexer.encoder import EncoderSpec, encode_group

    ds = open_dataset("sample", include_snow_cloud=True, chunk_size=5)
    chunks = ds.chunks("s2")
    batches = [ds.read_chunk(c) for c in chunks]
    torch._dynamo.reset()
    counters.clear()
    for group in ([0], [0, 1], [0, 1, 2], [3, 4]):
        encode_group([batches[i] for i in group], [chunks[i] for i in group], EncoderSpec("csmoe-tiny", "cuda", 8, compile=True))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]


def test_the_gpu_cluster_layout_end_to_end(tmp_path):
    import xarray as xr
    from distributed import Client

    from rsretrieve.indexer.cluster import gpu_layout, local_cluster
    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode

    spec = DatasetSpec("sample", options=SAMPLE_OPTIONS)
    with local_cluster(workers=gpu_layout(torch.cuda.device_count(), 2)) as cluster, Client(cluster) as client:
        summary = encode(spec, "s2", tmp_path / "gpu.zarr", EncoderSpec("csmoe-tiny", "cuda"), client=client)
    assert summary.provenance["precision"] == "bfloat16"
    with local_cluster(workers=gpu_layout(0, 2) | {"cpu": gpu_layout(1, 0)["encoder-0"]}) as cluster, Client(cluster) as client:
        encode(spec, "s2", tmp_path / "cpu.zarr", EncoderSpec("csmoe-tiny", "cpu"), client=client)
    a, b = (xr.open_zarr(tmp_path / name, group="s2") for name in ("gpu.zarr", "cpu.zarr"))
    assert cosines(a["embedding"].values, b["embedding"].values).min() >= 0.999


def test_faiss_gpu_search_equals_cpu_search():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU here")
    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    x = np.random.default_rng(0).standard_normal((20_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind, params in (("flat", {}), ("ivfpq", {"nlist": 64, "m": 8, "nprobe": 16, "k_factor": 4.0})):
        cpu = EmbeddingIndex.from_vectors(x, kind=kind, use_gpu=False, **params)
        gpu = EmbeddingIndex.from_vectors(x, kind=kind, use_gpu=True, **params)
        assert gpu.gpu_notice is None and gpu._search_index is not gpu.cpu_index
        (_, ra), (_, rb) = cpu.search(x[:200], 10), gpu.search(x[:200], 10)
        assert (ra[:, 0] == rb[:, 0]).mean() >= 0.99


def test_faiss_gpu_coarse_quantizer_of_ivfpq_disk_equals_cpu_search(tmp_path):
    """ivfpq-disk: queries assigned to lists on the GPU, lists scanned and re-ranked on the CPU."""
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU here")
    from test_index_ondisk import mixture, write_store

    from rsretrieve.retrieval.faiss_index import EmbeddingIndex

    x = mixture(20_000, seed=1)
    store = write_store(tmp_path / "s.zarr", x)
    built = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", use_gpu=True, nprobe=16, k_factor=4.0)
    assert built.gpu_notice is None  # trained on the GPU
    directory = built.save(tmp_path / "index" / "s2", store_id=store.store_id)
    cpu = EmbeddingIndex.load(directory, store_path=store.path, use_gpu=False)
    gpu = EmbeddingIndex.load(directory, store_path=store.path, use_gpu=True)
    assert gpu.gpu_notice is None and gpu._search_index is not gpu.cpu_index
    (sa, ra), (sb, rb) = cpu.search(x[:500], 10), gpu.search(x[:500], 10)
    assert (ra[:, 0] == rb[:, 0]).mean() >= 0.99
    np.testing.assert_allclose(sa[:, 0], sb[:, 0], atol=1e-5)
