"""EmbeddingIndex: exactness, streaming, approximate recall, persistence, selection."""

import numpy as np
import pytest
import xarray as xr

import rsretrieve.retrieval.faiss_index as fi
import rsretrieve.store.read as store_read
from rsretrieve.errors import StoreError
from rsretrieve.retrieval import EmbeddingIndex, index_is_current, recall_at_k

PROV = {"model": "csmoe_p14", "config": {"embed_dim": 16}, "checkpoint_sha256": "abc123", "dtype": "float32"}


def clustered(n, dim=768, sub=32, clusters=64, seed=0, noise=0.02):
    """Mixture of Gaussians in a random `sub`-dim subspace of `dim`, plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, sub)))
    centres = rng.standard_normal((clusters, sub)) * 1.0
    assign = rng.integers(0, clusters, n)
    low = centres[assign] + 0.35 * rng.standard_normal((n, sub))
    x = low @ basis.T + noise * rng.standard_normal((n, dim)) + 0.5 * basis[:, 0]
    return x.astype(np.float32)


def make_store(path, embeddings, splits=None, chunk=None, prov=PROV, group="s2"):
    n = embeddings.shape[0]
    rng = np.random.default_rng(1)
    coords = {
        "patch_id": ("patch", np.array([f"p{i:05d}" for i in range(n)], dtype=object)),
        "pair_id": ("patch", np.array([f"pair{i:05d}" for i in range(n)], dtype=object)),
        "split": ("patch", np.array(splits if splits is not None else ["test"] * n, dtype=object)),
        "labels": (("patch", "label"), rng.random((n, 19)) < 0.2),
        "label": ("label", np.array([f"c{i}" for i in range(19)], dtype=object)),
    }
    ds = xr.Dataset({"embedding": (("patch", "dim"), embeddings)}, coords=coords)
    ds.attrs["provenance"] = prov
    if chunk:
        ds["embedding"] = ds["embedding"].chunk({"patch": chunk})
    ds.to_zarr(path, group=group, mode="w", zarr_format=3, consolidated=False)
    return xr.open_zarr(path, group=group, consolidated=False)


def brute_force(archive, queries, k):
    a = archive / np.linalg.norm(archive, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_flat_matches_numpy_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    archive = rng.standard_normal((500, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    ds = make_store(tmp_path / "s.zarr", archive)
    index = EmbeddingIndex.build(ds, kind="flat")
    scores, rows = index.search(queries, 10)
    ref_scores, ref_rows = brute_force(archive, queries, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    # ties aside: every mismatch must be a near-tie in the reference similarities
    mismatch = rows != ref_rows
    assert mismatch.sum() == 0 or np.all(np.abs(scores[mismatch] - ref_scores[mismatch]) < 1e-5)
    assert index.kind == "flat" and index.ntotal == 500
    _, pids = index.search_patch_ids(queries[:2], 3)
    assert pids[0, 0] == f"p{rows[0, 0]:05d}"


def test_auto_kind_and_defaults():
    assert fi.auto_kind(10_000) == "flat" and fi.auto_kind(2_000_000) == "ivfpq"
    assert fi.default_pq_m(768) == 96 and 768 % fi.default_pq_m(768) == 0
    assert fi.default_pq_m(100) == 10
    assert fi.default_nlist(1_000_000) == 4000


def test_streaming_same_index_and_batches_respected(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((1000, 16)).astype(np.float32)
    one = make_store(tmp_path / "one.zarr", emb)
    small = make_store(tmp_path / "small.zarr", emb, chunk=37)
    calls = []
    real = store_read.read_rows

    def spy(ds, start, stop):
        calls.append((start, stop))
        return real(ds, start, stop)

    monkeypatch.setattr(store_read, "read_rows", spy)
    a = EmbeddingIndex.build(one, kind="flat", batch_size=1_000_000)
    assert calls == [(0, 1000)]
    calls.clear()
    b = EmbeddingIndex.build(small, kind="flat", batch_size=128)
    assert len(calls) == 8 and all(stop - start <= 128 for start, stop in calls)
    assert calls[0] == (0, 128) and calls[-1] == (896, 1000)
    xa = a.cpu_index.reconstruct_n(0, a.ntotal)
    xb = b.cpu_index.reconstruct_n(0, b.ntotal)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_allclose(np.linalg.norm(xa, axis=1), 1.0, atol=1e-6)


def test_ivfpq_with_refine_reaches_recall(tmp_path):
    data = clustered(24_000, seed=3)
    queries = clustered(24_200, seed=3)[-200:]  # same mixture, not in the archive
    archive = data
    index = EmbeddingIndex.from_vectors(archive, kind="ivfpq", seed=0)
    assert index.kind == "ivfpq" and index.params["refine"] == "flat"
    assert 768 % index.params["m"] == 0 and index.params["nbits"] == 8
    _, truth = brute_force(archive, queries, 10)
    _, rows = index.search(queries, 10)
    recall = recall_at_k(rows, truth)
    assert recall >= 0.95, (recall, index.params)


def test_hnsw_reaches_recall():
    archive = clustered(8_000, seed=5)
    queries = clustered(8_100, seed=5)[-100:]
    index = EmbeddingIndex.from_vectors(archive, kind="hnsw")
    assert index.params["hnsw_m"] == 32
    _, truth = brute_force(archive, queries, 10)
    _, rows = index.search(queries, 10)
    assert recall_at_k(rows, truth) >= 0.95


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    archive = clustered(3000, dim=64, sub=8, clusters=10, seed=7)
    ds = make_store(tmp_path / "s.zarr", archive)
    index = EmbeddingIndex.build(ds, kind=kind, **({"nlist": 16} if kind == "ivfpq" else {}))
    queries = clustered(50, dim=64, sub=8, clusters=10, seed=8)
    s1, r1 = index.search(queries, 10)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx", expected_provenance=dict(PROV, created="another time"))
    s2, r2 = loaded.search(queries, 10)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(index.patch_ids, loaded.patch_ids)
    assert loaded.kind == kind and loaded.params == index.params
    assert index_is_current(tmp_path / "idx", PROV, 3000)
    assert not index_is_current(tmp_path / "idx", PROV, 3001)
    assert not index_is_current(tmp_path / "idx", dict(PROV, checkpoint_sha256="other"), 3000)
    assert not index_is_current(tmp_path / "nothing", PROV, 3000)


def test_load_refuses_other_provenance(tmp_path):
    ds = make_store(tmp_path / "s.zarr", np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    EmbeddingIndex.build(ds).save(tmp_path / "idx")
    with pytest.raises(StoreError) as err:
        EmbeddingIndex.load(tmp_path / "idx", expected_provenance=dict(PROV, checkpoint_sha256="random-init"))
    message = str(err.value)
    assert "\n" not in message and "checkpoint_sha256" in message and "rebuild" in message


@pytest.mark.parametrize("kind,n,params", [("flat", 6, {}), ("hnsw", 6, {}), ("ivfpq", 300, {"nlist": 4, "m": 4, "nprobe": 4})])
def test_k_larger_than_archive_is_clamped(tmp_path, kind, n, params):
    """A k over the archive's size returns the whole archive (once each, best first), for every kind."""
    vectors = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    index = EmbeddingIndex.from_vectors(vectors, kind=kind, use_gpu=False, tune=False, **params)
    scores, rows = index.search(vectors[:1], n + 14)
    assert scores.shape == rows.shape == (1, n) and sorted(rows[0].tolist()) == list(range(n))
    assert np.all(np.diff(scores[0]) <= 1e-5)  # best first


def test_selection_by_split_mask_and_indices(tmp_path):
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((300, 12)).astype(np.float32)
    splits = np.array(["train", "validation", "test"])[rng.integers(0, 3, 300)]
    ds = make_store(tmp_path / "s.zarr", emb, splits=splits, chunk=50)
    index = EmbeddingIndex.build(ds, split="test", batch_size=64)
    test_rows = np.flatnonzero(splits == "test")
    np.testing.assert_array_equal(np.sort(index.rows), test_rows)
    assert index.ntotal == test_rows.size and index.selection["split"] == "test"
    _, rows = index.search(emb[:20], 5)
    assert np.isin(rows, test_rows).all()
    _, ref = brute_force(emb[test_rows], emb[:20], 5)
    np.testing.assert_array_equal(rows, test_rows[ref])
    by_mask = EmbeddingIndex.build(ds, rows=splits == "test")
    by_idx = EmbeddingIndex.build(ds, rows=test_rows)
    np.testing.assert_array_equal(by_mask.rows, test_rows)
    np.testing.assert_array_equal(by_idx.rows, test_rows)


def test_invalid_rows_are_not_indexed(tmp_path):
    emb = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    emb[3] = np.nan
    ds = xr.Dataset({"embedding": (("patch", "dim"), emb), "valid": ("patch", np.arange(10) != 3)},
                    coords={"patch_id": ("patch", np.array([str(i) for i in range(10)], dtype=object))})
    index = EmbeddingIndex.build(ds)
    assert 3 not in index.rows and index.ntotal == 9


def test_build_from_path_float16(tmp_path):
    emb = np.random.default_rng(9).standard_normal((200, 16)).astype(np.float16)
    make_store(tmp_path / "s.zarr", emb, group="s1")
    index = EmbeddingIndex.build(tmp_path / "s.zarr", "s1", kind="auto")
    assert index.kind == "flat" and index.modality == "s1"
    _, rows = index.search(emb[:5].astype(np.float32), 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))  # each vector finds itself
    with pytest.raises(StoreError, match="no s2 group"):
        EmbeddingIndex.build(tmp_path / "s.zarr", "s2")


def test_ivfpq_too_few_vectors_is_one_line_store_error(tmp_path):
    rng = np.random.default_rng(4)
    ds = make_store(tmp_path / "s.zarr", rng.standard_normal((24, 64)).astype(np.float32))
    with pytest.raises(StoreError) as e:
        EmbeddingIndex.build(ds, kind="ivfpq")
    assert str(e.value) == "--index ivfpq needs at least 256 vectors to train; this archive has 24: use --index flat"
    # the minimum follows nlist and nbits; at the minimum faiss trains (with a quality warning)
    assert fi.ivfpq_min_vectors(1, 8) == 256 and fi.ivfpq_min_vectors(300, 4) == 300
    with pytest.raises(StoreError, match="needs at least 32 vectors"):
        EmbeddingIndex.build(ds, kind="ivfpq", nlist=32, nbits=4, tune=False)
    index = EmbeddingIndex.build(ds, kind="ivfpq", nlist=1, nbits=4, tune=False)
    assert index.ntotal == 24 and index.params["nbits"] == 4
