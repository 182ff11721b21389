"""faiss on GPUs (issue 28, defect 4): `--gpu-search` without a GPU says why in one line instead
of falling back silently, and the GPU forms of the indexes are wired right (checked on the CPU
with faiss's clone standing in for the GPU copy; `cuda` tests compare on a real GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from rsretrieve.retrieval import gpu
from rsretrieve.retrieval.faiss_index import EmbeddingIndex


def unit_vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_without_a_gpu_the_index_says_why_it_searches_on_the_cpu():
    index = EmbeddingIndex.from_vectors(unit_vectors(100), kind="flat", use_gpu=True)
    assert index.gpu_notice and "\n" not in index.gpu_notice
    assert index.gpu_notice.startswith("--gpu-search: searching on the CPU: ") and "faiss-cpu" in index.gpu_notice
    assert EmbeddingIndex.from_vectors(unit_vectors(100), kind="flat", use_gpu=False).gpu_notice is None


@pytest.fixture
def clone_for_gpu(monkeypatch):
    """faiss 'has a GPU' whose copies are CPU clones: the wiring runs, the arithmetic is the CPU's."""
    import faiss

    copies = []

    def to_all_gpus(index):
        copies.append(faiss.clone_index(index))
        return copies[-1]

    monkeypatch.setattr(gpu, "why_no_gpu", lambda: None)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    return copies


def test_ivfpq_searches_its_inner_index_on_the_gpu_and_re_ranks_on_the_cpu(clone_for_gpu):
    vectors = unit_vectors(3000)
    cpu = EmbeddingIndex.from_vectors(vectors, kind="ivfpq", use_gpu=False, nlist=16, m=8, nprobe=4, k_factor=4.0)
    on_gpu = EmbeddingIndex.from_vectors(vectors, kind="ivfpq", use_gpu=True, nlist=16, m=8, nprobe=4, k_factor=4.0)
    assert on_gpu.gpu_notice is None and len(clone_for_gpu) == 1
    assert "IVF" in type(clone_for_gpu[0]).__name__ and "Refine" not in type(clone_for_gpu[0]).__name__  # the inner IVF-PQ went
    assert on_gpu._search_index is not on_gpu.cpu_index
    assert on_gpu._search_index.refine_index.this == on_gpu.cpu_index.refine_index.this  # the re-rank's vectors: the CPU's own
    queries = vectors[:20]
    (sa, ra), (sb, rb) = cpu.search(queries, 10), on_gpu.search(queries, 10)
    np.testing.assert_array_equal(ra, rb)
    np.testing.assert_allclose(sa, sb, rtol=1e-6)
    assert rb[:, 0].tolist() == list(range(20))  # exact re-rank: each vector finds itself first


def test_hnsw_says_it_has_no_gpu_form(clone_for_gpu):
    index = EmbeddingIndex.from_vectors(unit_vectors(200), kind="hnsw", use_gpu=True)
    assert "no GPU HNSW" in index.gpu_notice and not clone_for_gpu


def test_a_failed_copy_is_one_line_naming_the_cause(monkeypatch):
    import faiss

    def fails(index):
        raise RuntimeError("Error in GpuIndexFlat:\n out of memory")

    monkeypatch.setattr(gpu, "why_no_gpu", lambda: None)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", fails, raising=False)
    index = EmbeddingIndex.from_vectors(unit_vectors(50), kind="flat", use_gpu=True)
    assert "\n" not in index.gpu_notice and "out of memory" in index.gpu_notice
    assert index.search(unit_vectors(50)[:1], 1)[1].tolist() == [[0]]  # the CPU index still answers


def test_query_with_gpu_search_says_in_one_line_why_it_searches_on_the_cpu(tmp_path):
    from rsretrieve.datasets import sample_root
    from test_cli import indexed_workspace, run

    ws = indexed_workspace(tmp_path / "ws")
    folder = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())[0]
    proc = run(["query", folder, "--target", "s2", "-k", "3", "--gpu-search"], ws)
    notices = [line for line in proc.stderr.splitlines() if "--gpu-search" in line]
    assert len(notices) == 1 and "searching on the CPU" in notices[0] and "faiss-cpu" in notices[0], proc.stderr
