"""faiss on GPUs (issue 28, defect 4): `--gpu-search` without a GPU says why in one line instead
of falling back silently (`query` and `index`), and the GPU forms of the indexes are wired right
(checked on the CPU with a CPU clone standing in for the GPU copy; `cuda` tests compare on a real
GPU): flat, in-RAM IVF-PQ, and ivfpq-disk's coarse quantizer (never written into the saved index)."""

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


# -- ivfpq-disk: the coarse quantizer on the GPU ----------------------------------------------------
class StandIn:
    """A CPU clone standing in for a GPU copy (`gpu.gpu_copy`), counting the searches made on it."""

    def __init__(self, index):
        import faiss

        self.index, self.calls = faiss.clone_index(index), []

    def search(self, x, k):
        self.calls.append((len(x), k))
        return self.index.search(x, k)


@pytest.fixture
def gpu_stand_in(monkeypatch):
    made = []

    def copy(index):
        made.append(StandIn(index))
        return made[-1]

    monkeypatch.setattr(gpu, "why_no_gpu", lambda: None)
    monkeypatch.setattr(gpu, "gpu_copy", copy)
    return made


@pytest.fixture(scope="module")
def saved_disk_indexes(tmp_path_factory):
    """A small store and its ivfpq-disk index (behind OPQ) saved, with a flat and with an HNSW coarse
    quantizer, the first built asking for a GPU: (store, {quantizer: directory}, queries, notices)."""
    from test_index_ondisk import mixture, write_store

    root = tmp_path_factory.mktemp("gpu-disk")
    store = write_store(root / "s.zarr", mixture(6000, seed=1))
    saved, notices = {}, {}
    for quantizer, use_gpu in (("flat", True), ("hnsw", False)):
        index = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", use_gpu=use_gpu, quantizer=quantizer, nprobe=8, k_factor=4.0,
                                     niter=5, opq_niter=5)
        saved[quantizer], notices[use_gpu] = index.save(root / quantizer / "s2", store_id=store.store_id), index.gpu_notice
    return store, saved, mixture(100, seed=2), notices


def load(store, directory, use_gpu):
    return EmbeddingIndex.load(directory, expected_provenance=store.provenance("s2"), store_id=store.store_id,
                               store_path=store.path, use_gpu=use_gpu)


def test_ivfpq_disk_assigns_queries_to_lists_on_the_gpu_and_scans_them_on_the_cpu(saved_disk_indexes, gpu_stand_in):
    import faiss

    from rsretrieve.retrieval import ondisk_ivf as disk

    store, saved, queries, _ = saved_disk_indexes
    cpu, on_gpu = load(store, saved["flat"], False), load(store, saved["flat"], True)
    assert on_gpu.gpu_notice is None and len(gpu_stand_in) == 1
    quantizer, ivf = gpu_stand_in[0], disk.ivf_of(on_gpu.cpu_index)
    assert quantizer.index.ntotal == ivf.nlist and ivf.ntotal == 6000  # the centroids went to the GPU, not the lists
    (sa, ra), (sb, rb) = cpu.search(queries, 10), on_gpu.search(queries, 10)
    assert quantizer.calls == [(100, 8)]  # one call assigned the whole batch to its nprobe lists
    np.testing.assert_array_equal(ra, rb)
    np.testing.assert_array_equal(sa, sb)  # the same shortlist, re-ranked exactly from the store
    assert disk.ondisk_lists(on_gpu.cpu_index) is not None  # the lists stay mapped, scanned on the CPU
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlatL2)  # the index keeps its CPU quantizer
    on_gpu.set_search_params(nprobe=16)
    on_gpu.search(queries[:3], 5)
    assert quantizer.calls[-1] == (3, 16)


def test_an_hnsw_quantizer_goes_to_the_gpu_as_its_centroids(saved_disk_indexes, gpu_stand_in):
    import faiss

    store, saved, queries, _ = saved_disk_indexes
    on_gpu = load(store, saved["hnsw"], True)
    assert on_gpu.gpu_notice is None and isinstance(gpu_stand_in[0].index, faiss.IndexFlat)  # faiss has no GPU HNSW
    _, rows = on_gpu.search(queries, 10)
    _, truth = load(store, saved["hnsw"], False).search(queries, 10)
    assert (rows[:, 0] == truth[:, 0]).mean() >= 0.95  # exact centroids instead of the graph's: as good or better


@pytest.mark.parametrize("quantizer", ["flat", "hnsw"])
def test_saving_a_gpu_searched_ivfpq_disk_index_writes_the_same_bytes(saved_disk_indexes, gpu_stand_in, tmp_path, monkeypatch, quantizer):
    import uuid

    store, saved, queries, _ = saved_disk_indexes
    # index.faiss names its index.ivfdata by the staging folder's path, which holds a random uuid
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=0))
    written = {}
    for use_gpu in (True, False):
        index = load(store, saved[quantizer], use_gpu)
        index.set_search_params(nprobe=16)
        index.search(queries, 10)
        out = index.save(tmp_path / "s2", store_id=store.store_id)
        written[use_gpu] = {name: (out / name).read_bytes() for name in ("index.faiss", "index.ivfdata")}
    assert len(gpu_stand_in) == 1 and gpu_stand_in[0].calls  # the first one did search on the "GPU"
    assert written[True] == written[False]


def test_a_grown_ivfpq_disk_index_keeps_searching_with_the_gpu_centroids(tmp_path, gpu_stand_in):
    from test_index_ondisk import _grown_store, mixture, write_store

    old, new = mixture(6000, seed=3), mixture(1000, seed=4)
    store = write_store(tmp_path / "g.zarr", old)
    directory = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", use_gpu=False, nprobe=8, k_factor=4.0, niter=5,
                                     opq=False).save(tmp_path / "index" / "s2", store_id=store.store_id)
    index = EmbeddingIndex.load(directory, store_path=store.path, use_gpu=True)
    store = _grown_store(store.path, old, new)
    assert index.extend(store.path, "s2") == 1000
    assert index._search_index.index is index.cpu_index  # the grown lists, searched with the same GPU centroids
    _, own = index.search(new[:20], 1)
    np.testing.assert_array_equal(own[:, 0], 6000 + np.arange(20))  # new vectors find themselves
    assert len(gpu_stand_in) == 1 and gpu_stand_in[0].calls == [(20, 8)]


def test_ivfpq_disk_without_a_gpu_searches_on_the_cpu_and_says_why(saved_disk_indexes):
    store, saved, queries, _ = saved_disk_indexes
    index = load(store, saved["flat"], True)
    assert index.gpu_notice.startswith("--gpu-search: searching on the CPU: ") and "faiss-cpu" in index.gpu_notice
    assert index._search_index is index.cpu_index and index.search(queries[:2], 3)[1].shape == (2, 3)


def test_a_failed_coarse_quantizer_copy_is_one_line(saved_disk_indexes, monkeypatch):
    def fails(index):
        raise RuntimeError("Error in GpuIndexFlat:\n out of memory")

    store, saved, queries, _ = saved_disk_indexes
    monkeypatch.setattr(gpu, "why_no_gpu", lambda: None)
    monkeypatch.setattr(gpu, "gpu_copy", fails)
    index = load(store, saved["flat"], True)
    assert "\n" not in index.gpu_notice and "coarse quantizer" in index.gpu_notice and "out of memory" in index.gpu_notice
    assert index.search(queries[:2], 3)[1].shape == (2, 3)  # the CPU index still answers


def test_an_ivfpq_disk_build_without_a_gpu_says_it_trained_on_the_cpu(saved_disk_indexes):
    notices = saved_disk_indexes[3]
    assert notices[True].startswith("--gpu-search: training on the CPU: ") and "faiss-cpu" in notices[True]
    assert notices[False] is None  # not asked for a GPU


def test_evaluate_with_use_gpu_carries_the_notice(tmp_path):
    from test_metrics import make_pair_store

    from rsretrieve.retrieval.evaluate import evaluate

    make_pair_store(tmp_path / "store.zarr")
    result = evaluate(tmp_path / "store.zarr", tasks=("s2s2",), k=5, use_gpu=True)
    assert result.gpu_notice.startswith("--gpu-search: searching on the CPU: ") and "faiss-cpu" in result.gpu_notice
    assert evaluate(tmp_path / "store.zarr", tasks=("s2s2",), k=5, use_gpu=False).gpu_notice is None


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_indexed(tmp_path_factory):
    """A workspace indexed (both modalities of the sample) with --gpu-search: (workspace, the run)."""
    from test_cli import MODEL, run

    ws = tmp_path_factory.mktemp("ws")
    return ws, run(["index", "--model", MODEL, "--gpu-search"], ws)


def test_index_with_gpu_search_says_in_one_line_why_it_built_on_the_cpu(gpu_indexed):
    _, proc = gpu_indexed
    notices = [line for line in proc.stderr.splitlines() if "--gpu-search" in line]
    assert len(notices) == 1 and "on the CPU" in notices[0] and "faiss-cpu" in notices[0], proc.stderr  # once for both modalities


def test_query_with_gpu_search_says_in_one_line_why_it_searches_on_the_cpu(gpu_indexed):
    from rsretrieve.datasets import sample_root
    from test_cli import run

    ws, _ = gpu_indexed
    folder = sorted(p for p in (sample_root() / "BigEarthNet-S2").glob("*/*") if p.is_dir())[0]
    proc = run(["query", folder, "--target", "s2", "-k", "3", "--gpu-search"], ws)
    notices = [line for line in proc.stderr.splitlines() if "--gpu-search" in line]
    assert len(notices) == 1 and "searching on the CPU" in notices[0] and "faiss-cpu" in notices[0], proc.stderr


def test_a_gpu_copy_that_fails_while_training_ivfpq_disk_is_a_notice_not_a_silent_fallback(tmp_path, monkeypatch):
    """On a machine with a GPU, the k-means and list-assignment copies fell back to the CPU silently
    when faiss could not make them: the build now says why, in the same one line."""
    from rsretrieve.retrieval import ondisk_ivf as disk
    from test_index_ondisk import mixture, write_store

    def out_of_memory(index):
        raise RuntimeError("Error in void faiss::gpu::allocMemorySpace\n  cudaMalloc error 2: out of memory")

    store = write_store(tmp_path / "s.zarr", mixture(3000, seed=1))
    monkeypatch.setattr(gpu, "why_no_gpu", lambda: None)
    monkeypatch.setattr(gpu, "gpu_copy", out_of_memory)
    monkeypatch.setattr(disk, "gpu_count", lambda: 1)
    index = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", use_gpu=True, nprobe=8, k_factor=4.0, niter=5, opq_niter=5)
    assert index.gpu_notice == ("--gpu-search: training on the CPU: faiss could not put the k-means assignment on the GPU "
                                "(Error in void faiss::gpu::allocMemorySpace cudaMalloc error 2: out of memory)")
    assert index.ntotal == 3000  # built on the CPU all the same
    _, problem = disk.gpu_assigner(index.cpu_index, use_gpu=True)
    assert problem and problem.startswith("faiss could not put the list assignment on the GPU")
