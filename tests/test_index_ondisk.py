"""The ``ivfpq-disk`` index: PQ codes on disk (mmapped), exact re-ranking from the store, built on
Dask or in-process, grown without rebuilding; and `extend` / `grow_index` for the in-RAM kinds."""

import os
import shutil

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rsretrieve.errors import StoreError
from rsretrieve.retrieval import EmbeddingIndex, index_is_current, recall_at_k
from rsretrieve.retrieval import ondisk_ivf as disk
from rsretrieve.retrieval.faiss_index import auto_kind
from rsretrieve.retrieval.index_meta import IVFDATA_FILE, damage, index_dir, read_meta
from rsretrieve.retrieval.ondisk_index import ram_bytes
from rsretrieve.store import EmbeddingStore
from rsretrieve.store.zarr_store import ChunkSpan

N, DIM, SPAN = 20_000, 64, 2_000
PROV = {"model": "csmoe_tiny", "config": {"embed_dim": DIM}, "checkpoint_sha256": "abc123", "preprocessing": {}}
SMALL = {"slice_rows": 6_000}  # several parts from a small archive


def mixture(n, seed, dim=DIM):
    """Clustered vectors like [CLS] embeddings: a Gaussian mixture in a 16-dim subspace + noise."""
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, 16)))
    centres = rng.standard_normal((64, 16))
    draw = np.random.default_rng(seed)
    low = centres[draw.integers(0, 64, n)] + 0.35 * draw.standard_normal((n, 16))
    return (low @ basis.T + 0.02 * draw.standard_normal((n, dim)) + 0.5 * basis[:, 0]).astype(np.float32)


def write_store(path, vectors, group="s2"):
    """A float16 store group through the store's own API (create, then write_chunk per span)."""
    n = len(vectors)
    ids = [f"p{i:06d}" for i in range(n)]
    spans = [ChunkSpan(f"c{i}", start, min(start + SPAN, n)) for i, start in enumerate(range(0, n, SPAN))]
    store = EmbeddingStore(path)
    meta = pa.table({"patch_id": ids, "lat": np.zeros(n), "lon": np.zeros(n)})
    store.create(group, meta, spans, vectors.shape[1], PROV, dtype="float16")
    for span in spans:
        store.write_chunk(group, span, ids[span.start:span.stop], vectors[span.start:span.stop].astype(np.float16))
    return store


def exact(archive, queries, k=10):
    """Exact cosine top-k in float64 (the store's float16 values)."""
    a = archive.astype(np.float16).astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ a.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ondisk")
    vectors = mixture(N, seed=1)
    store = write_store(root / "s.zarr", vectors)
    index = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", **SMALL)
    return store, vectors, index, mixture(200, seed=2)


def test_sequential_build_reaches_recall_with_exact_cosines(archive):
    store, vectors, index, queries = archive
    assert index.kind == "ivfpq-disk" and index.ntotal == N and disk.ondisk_lists(index.cpu_index) is not None
    truth_scores, truth = exact(vectors, queries)
    scores, rows = index.search(queries, 10)
    assert recall_at_k(rows, truth) >= 0.9, index.params
    assert index.params["tuned_recall"] >= 0.95  # tuned against the exact top-10 found while adding
    # every returned score is the exact cosine of that store row (float16 in the store)
    stored = vectors[rows].astype(np.float16).astype(np.float64)
    cosines = np.einsum("qkd,qd->qk", stored / np.linalg.norm(stored, axis=2, keepdims=True),
                        queries / np.linalg.norm(queries, axis=1, keepdims=True))
    np.testing.assert_allclose(scores, cosines, atol=2e-6)
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_allclose(scores[:, 0], truth_scores[:, 0], atol=2e-6)  # the best hit is the true best
    assert index._rows is None  # searching never loaded the ids of the archive
    _, pids = index.search_patch_ids(queries[:3], 4)
    assert pids[0, 0] == f"p{rows[0, 0]:06d}" and pids.shape == (3, 4)


def test_distributed_build_equals_sequential(archive):
    from distributed import Client, LocalCluster

    from rsretrieve.indexer.index_build import build_index, thread_share

    store, _, sequential, queries = archive
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        assert thread_share(client) >= 1
        distributed = build_index(client, store.path, "s2", **SMALL)
        pids = set(client.run(os.getpid).values())
    assert len(pids) == 2 and distributed.ntotal == sequential.ntotal == N
    same = {key: value for key, value in distributed.params.items() if key != "build_s"}
    assert same == {key: value for key, value in sequential.params.items() if key != "build_s"}
    s1, r1 = sequential.search(queries, 10)
    s2, r2 = distributed.search(queries, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)


def test_hnsw_quantizer_and_lists_assigned_by_a_flat_index(archive, monkeypatch):
    """The other ways of adding: an HNSW coarse quantizer (the default from nlist 4096), and lists
    assigned by a flat index of the centroids (what a GPU does where faiss has one), here on CPU."""
    import faiss

    store, vectors, index, queries = archive
    hnsw = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", quantizer="hnsw", **SMALL)
    assert isinstance(faiss.downcast_index(disk.ivf_of(hnsw.cpu_index).quantizer), faiss.IndexHNSWFlat)
    _, truth = exact(vectors, queries)
    assert recall_at_k(hnsw.search(queries, 10)[1], truth) >= 0.9

    def cpu_flat(trained, use_gpu=True):
        ivf = disk.ivf_of(trained)
        flat = faiss.IndexFlatL2(ivf.d)
        flat.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        calls.append(ivf.nlist)
        return flat, None  # (assigner, why not on the GPU)

    calls = []
    monkeypatch.setattr(disk, "gpu_assigner", cpu_flat)
    assigned = EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", **SMALL)
    assert len(calls) == 4  # one per slice
    np.testing.assert_array_equal(assigned.search(queries, 10)[1], index.search(queries, 10)[1])


def test_memory_per_vector_is_the_pq_code_and_id():
    params = disk.disk_params(10_000_000, 768, {})
    assert (params["m"], params["nbits"], params["nlist"], params["quantizer"]) == (64, 8, 16384, "hnsw")
    sample = mixture(3_000, seed=5, dim=768)
    index = disk.train_empty(sample.copy(), disk.disk_params(3_000, 768, {"nlist": 16, "train_size": 3_000, "niter": 2, "opq_niter": 2}))
    index.add_with_ids(sample, np.arange(3_000))
    ivf = disk.ivf_of(index)
    assert ivf.code_size + 8 == 72 <= 100  # 64 B PQ code + 8 B id a vector
    centroids_codebooks_rotation = 16 * 768 * 4 + ivf.pq.centroids.size() * 4 + 768 * 768 * 4
    assert ram_bytes(index) == 3_000 * 72 + centroids_codebooks_rotation
    assert disk.ivf_of(index).use_precomputed_table == -1  # no nlist x M x 256 table in RAM


@pytest.mark.parametrize("n", [10_000_000, 100_000_000, 144_000_000, 238_000_000])
def test_the_training_sample_keeps_within_its_budget_up_to_major_tom_core(n):
    params = disk.disk_params(n, 768, {})
    assert params["train_size"] * 768 * 4 <= disk.TRAIN_BYTES <= 4 << 30  # the float32 sample the client holds
    assert params["train_size"] >= disk.POINTS_PER_CENTROID * params["nlist"]  # and every centroid its 40 points
    assert params["nlist"] == (16_384 if n == 10_000_000 else 32_768)


def test_training_in_place_equals_faiss_training_the_rotation_and_the_index_together():
    """`train_empty` rotates the sample in place instead of letting IndexPreTransform.train hold a
    rotated copy: the trained index must be the one faiss's own path trains."""
    import faiss

    sample = mixture(4_000, seed=8, dim=64)
    params = disk.disk_params(4_000, 64, {"nlist": 16, "m": 8, "train_size": 4_000, "niter": 4, "opq_niter": 3, "quantizer": "flat"})
    ours = disk.train_empty(sample.copy(), params)
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(64), 64, 16, 8, 8, faiss.METRIC_L2)
    ivf.cp.niter, ivf.cp.seed = 4, 0
    rotation = faiss.OPQMatrix(64, 8)
    rotation.niter = 3
    reference = faiss.IndexPreTransform(rotation, ivf)
    reference.train(sample)
    theirs = disk.ivf_of(reference)
    np.testing.assert_array_equal(faiss.vector_to_array(faiss.downcast_VectorTransform(ours.chain.at(0)).A), faiss.vector_to_array(rotation.A))
    np.testing.assert_array_equal(disk.ivf_of(ours).quantizer.reconstruct_n(0, 16), theirs.quantizer.reconstruct_n(0, 16))
    np.testing.assert_array_equal(faiss.vector_to_array(disk.ivf_of(ours).pq.centroids), faiss.vector_to_array(theirs.pq.centroids))
    assert ours.is_trained and ours.ntotal == 0
    with pytest.raises(ValueError, match="float32"):
        disk.train_empty(sample.astype(np.float64), params)


def test_save_load_is_memory_mapped_and_refuses_a_truncated_ivfdata(archive, tmp_path):
    store, _, index, queries = archive
    directory = index.save(tmp_path / "idx", store_id=store.store_id)
    assert sorted(p.name for p in directory.iterdir()) == ["index.faiss", "index.ivfdata", "index.json"]
    meta = read_meta(directory)
    assert set(meta["files"]) == {"index.faiss", "index.ivfdata"} and meta["params"]["bytes_per_vector"] > 0
    assert (directory / IVFDATA_FILE).stat().st_size == N * (disk.ivf_of(index.cpu_index).code_size + 8)
    loaded = EmbeddingIndex.load(directory, expected_provenance=store.provenance("s2"), store_id=store.store_id, store_path=store.path)
    lists = disk.ondisk_lists(loaded.cpu_index)
    assert lists is not None and lists.read_only and lists.filename == str((directory / IVFDATA_FILE).resolve())
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
    assert loaded.params == meta["params"] and loaded._rows is None
    np.testing.assert_array_equal(loaded.rows, np.arange(N))
    with pytest.raises(StoreError, match="store_path"):
        EmbeddingIndex.load(directory)
    # a copy to damage (the indexes above map these very files)
    directory = Path(shutil.copytree(directory, tmp_path / "copy"))
    # the big file is hashed by `verify` only: loading compares its size
    data = bytearray((directory / IVFDATA_FILE).read_bytes())
    data[100] ^= 0xFF
    (directory / IVFDATA_FILE).write_bytes(bytes(data))
    assert damage(directory, meta, checksums=1000) is None
    assert damage(directory, meta, checksums=True) == "index.ivfdata does not match its SHA-256 in index.json"
    (directory / IVFDATA_FILE).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(StoreError) as err:
        EmbeddingIndex.load(directory, store_path=store.path)
    message = str(err.value)
    assert "\n" not in message and f"index.ivfdata is {len(data) // 2} bytes" in message and "rsretrieve index" in message


def test_auto_picks_ivfpq_disk_from_the_threshold(archive):
    store, _, _, _ = archive
    assert auto_kind(999_999, on_disk=True) == "flat" and auto_kind(1_000_000, on_disk=True) == "ivfpq-disk"
    assert auto_kind(2_000_000) == "ivfpq"  # no store on disk to re-rank from
    small = {"nlist": 32, "tune": False, "nprobe": 8, "k_factor": 4}
    assert EmbeddingIndex.build(store.path, "s2", kind="auto", auto_threshold=N, **small).kind == "ivfpq-disk"
    assert EmbeddingIndex.build(store.path, "s2", kind="auto", auto_threshold=N + 1).kind == "flat"


def _grown_store(path, old_vectors, new_vectors):
    """The store after its dataset gained chunks (`EmbeddingStore.grow`), the new rows encoded."""
    store = EmbeddingStore(path)
    old_spans, _ = store.ledger("s2")
    n_old, n = len(old_vectors), len(old_vectors) + len(new_vectors)
    new_spans = [ChunkSpan(f"new{i}", start, min(start + SPAN, n)) for i, start in enumerate(range(n_old, n, SPAN))]
    ids = [f"p{i:06d}" for i in range(n)]
    meta = pa.table({"patch_id": ids[n_old:], "lat": np.zeros(n - n_old), "lon": np.zeros(n - n_old)})
    store.grow("s2", old_spans + new_spans, meta, {**store.provenance("s2"), "dataset": {"name": "synthetic", "grown": True}})
    vectors = np.concatenate([old_vectors, new_vectors])
    for span in new_spans:
        store.write_chunk("s2", span, ids[span.start:span.stop], vectors[span.start:span.stop].astype(np.float16))
    return store


def test_extend_adds_only_new_rows_without_reencoding(tmp_path):
    from rsretrieve.indexer.jobs import grow_index

    old_vectors, new_vectors, queries = mixture(16_000, seed=7), mixture(4_000, seed=8), mixture(100, seed=9)
    store = write_store(tmp_path / "g.zarr", old_vectors)
    directory = index_dir(tmp_path / "indexes", store.path, store.store_id, "s2")
    EmbeddingIndex.build(store.path, "s2", kind="ivfpq-disk", **SMALL).save(directory, store_id=store.store_id)
    before = EmbeddingIndex.load(directory, store_path=store.path)
    codes_before = _codes_by_id(before.cpu_index)
    nprobe, k_factor = before.params["nprobe"], before.params["k_factor"]
    assert grow_index(store, "s2", directory, kind="ivfpq-disk") is None  # nothing new: nothing to add
    store = _grown_store(store.path, old_vectors, new_vectors)
    assert not index_is_current(directory, store.provenance("s2"), 20_000, store_id=store.store_id)
    assert grow_index(store, "s2", directory) is None  # `auto` would pick flat at 20,000 vectors: rebuild
    outcome = grow_index(store, "s2", directory, kind="ivfpq-disk")
    assert outcome is not None and outcome.added == 4_000 and outcome.vectors == 20_000 and outcome.kind == "ivfpq-disk"
    assert index_is_current(directory, store.provenance("s2"), 20_000, selection={"n_selected": 20_000}, store_id=store.store_id)
    after = EmbeddingIndex.load(directory, store_path=store.path)
    assert (after.params["nprobe"], after.params["k_factor"]) == (nprobe, k_factor)  # same trained index, same tuning
    np.testing.assert_array_equal(after.rows, np.arange(20_000))
    codes_after = _codes_by_id(after.cpu_index)
    assert all(codes_after[i] == code for i, code in codes_before.items())  # old codes copied, not re-encoded
    _, truth = exact(np.concatenate([old_vectors, new_vectors]), queries)
    assert recall_at_k(after.search(queries, 10)[1], truth) >= 0.9
    _, own = after.search(new_vectors[:20], 1)
    np.testing.assert_array_equal(own[:, 0], 16_000 + np.arange(20))  # new vectors find themselves
    with pytest.raises(ValueError, match="has not seen"):
        after.extend(store.path, "s2", np.arange(10))


def _codes_by_id(index) -> dict:
    import faiss

    lists = disk.ivf_of(index).invlists
    out = {}
    for list_no in range(lists.nlist):
        size = lists.list_size(list_no)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(list_no), size)
            codes = faiss.rev_swig_ptr(lists.get_codes(list_no), size * lists.code_size).reshape(size, -1)
            out.update({int(i): bytes(c) for i, c in zip(ids, codes)})
    return out


def test_in_ram_kinds_grow_with_extend(tmp_path):
    from rsretrieve.indexer.jobs import grow_index

    old_vectors, new_vectors = mixture(3_000, seed=11), mixture(1_000, seed=12)
    store = write_store(tmp_path / "f.zarr", old_vectors)
    directory = index_dir(tmp_path / "indexes", store.path, store.store_id, "s2")
    EmbeddingIndex.build(store.path, "s2", kind="flat").save(directory, store_id=store.store_id)
    store = _grown_store(store.path, old_vectors, new_vectors)
    assert grow_index(store, "s2", directory, kind="hnsw") is None  # another kind is asked: rebuild
    outcome = grow_index(store, "s2", directory)
    assert outcome.added == 1_000 and outcome.kind == "flat" and outcome.summary().startswith("flat (exact), 256 B/vector")
    index = EmbeddingIndex.load(directory)
    queries = mixture(30, seed=13)
    scores, rows = index.search(queries, 5)
    ref_scores, ref_rows = exact(np.concatenate([old_vectors, new_vectors]), queries, 5)
    np.testing.assert_array_equal(rows, ref_rows)
    assert list(index.patch_ids[-2:]) == ["p003998", "p003999"] and index.n_store_rows == 4_000


def test_outcome_line_and_archive_queries(archive, tmp_path):
    from rsretrieve.indexer.jobs import IndexOutcome
    from rsretrieve.retrieval import Archive

    store, vectors, index, queries = archive
    line = IndexOutcome(tmp_path, True, index.kind, index.ntotal, index.params).summary()
    assert line.startswith(f"ivfpq-disk (nlist {index.params['nlist']}, OPQ+PQ{index.params['m']}, nprobe ")
    assert line.endswith(f"re-rank from the store), {index.params['bytes_per_vector']:,.0f} B/vector in RAM")
    index.save(index_dir(tmp_path, store.path, store.store_id, "s2"), store_id=store.store_id)
    hits = Archive(store, tmp_path).search(queries[:2], "s2", 5)
    _, rows = index.search(queries[:2], 5)
    assert [h.patch_id for h in hits[0]] == [f"p{r:06d}" for r in rows[0]]


def test_k_larger_than_the_archive_is_clamped(archive):
    store, _, index, queries = archive
    scores, rows = index.search(queries[:1], N + 5)
    assert scores.shape == rows.shape == (1, N)
    found = rows[0][rows[0] >= 0]
    assert len(found) == len(set(found.tolist())) and (np.diff(scores[0][rows[0] >= 0]) <= 0).all()
