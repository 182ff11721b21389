"""Retrieval scores: brute-force reference for all four tasks, a hand-worked case, F1 definition."""

import json

import numpy as np
import pytest
import xarray as xr

from rsretrieve.retrieval.evaluate import TASKS, evaluate
from rsretrieve.retrieval.metrics import per_query_f1, retrieval_scores

PROV = {"model": "csmoe_p14", "config": {}, "checkpoint_sha256": "feedbeef", "dtype": "float32"}


def reference_scores(query_labels, retrieved_labels, archive_labels=None):
    """Plain loops, the protocol as written (0/0 := 0); mAP@k normalised by min(k, relevant items
    in the archive), or by k without an archive."""
    precision = recall = ap_sum = f1_sum = 0.0
    n = len(query_labels)
    for q, retrieved in zip(query_labels, retrieved_labels):
        p_q = r_q = 0.0
        hits = 0
        ap = 0.0
        for i, r in enumerate(retrieved, start=1):
            common = sum(1 for a, b in zip(q, r) if a and b)
            p_q += common / sum(r) if sum(r) else 0.0
            r_q += common / sum(q) if sum(q) else 0.0
            if common:
                hits += 1
                ap += hits / i
        k = len(retrieved)
        n_rel = k if archive_labels is None else sum(1 for a in archive_labels if any(x and y for x, y in zip(q, a)))
        precision += p_q / k
        recall += r_q / k
        f1_sum += 2 * (p_q / k) * (r_q / k) / (p_q / k + r_q / k) if p_q + r_q else 0.0
        ap_sum += ap / min(k, n_rel) if n_rel else 0.0
    P, R = precision / n, recall / n
    return {"precision": P, "recall": R, "f1": 2 * P * R / (P + R) if P + R else 0.0, "map": ap_sum / n, "f1_macro": f1_sum / n}


def make_pair_store(path, n_val=30, n_test=50, dim=16, seed=0, prov=PROV):
    rng = np.random.default_rng(seed)
    n = n_val + n_test
    labels = rng.random((n, 19)) < 0.15
    labels[np.arange(n), rng.integers(0, 19, n)] = True  # >= 1 label, as in BigEarthNet
    split = np.array(["validation"] * n_val + ["test"] * n_test, dtype=object)
    perm = rng.permutation(n)  # interleave splits
    data = {}
    for modality, offset in (("s1", 0), ("s2", 1)):
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        ds = xr.Dataset(
            {"embedding": (("patch", "dim"), emb[perm])},
            coords={
                "patch_id": ("patch", np.array([f"{modality}_{i}" for i in perm], dtype=object)),
                "pair_id": ("patch", np.array([f"pair{i}" for i in perm], dtype=object)),
                "split": ("patch", split[perm]),
                "labels": (("patch", "label"), labels[perm]),
                "label": ("label", np.array([f"c{i}" for i in range(19)], dtype=object)),
            },
        )
        ds.attrs["provenance"] = prov
        ds.to_zarr(path, group=modality, mode="w", zarr_format=3, consolidated=False)
        data[modality] = (emb[perm], split[perm], labels[perm])
    return data


def brute_force_task(data, source, target, k):
    q_emb, q_split, q_lab = data[source]
    a_emb, a_split, a_lab = data[target]
    q_rows = np.flatnonzero(q_split == "validation")
    a_rows = np.flatnonzero(a_split == "test")
    q = q_emb[q_rows].astype(np.float64)
    a = a_emb[a_rows].astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    order = np.argsort(-(q @ a.T), axis=1, kind="stable")[:, :k]
    retrieved = [[a_lab[a_rows[j]].tolist() for j in line] for line in order]
    archive = [a_lab[j].tolist() for j in a_rows]
    return reference_scores([q_lab[i].tolist() for i in q_rows], retrieved, archive), len(q_rows), len(a_rows)


def test_evaluate_matches_brute_force_all_tasks(tmp_path):
    path = tmp_path / "store.zarr"
    data = make_pair_store(path)
    result = evaluate(path, k=10)
    assert list(result.tasks) == list(TASKS)
    for task in TASKS:
        ref, n_q, n_a = brute_force_task(data, task[:2], task[2:], 10)
        got = result.tasks[task]
        assert (got.n_queries, got.n_archive) == (n_q, n_a) == (30, 50)
        for key in ("precision", "recall", "f1", "map", "f1_macro"):
            assert getattr(got, key) == pytest.approx(ref[key], abs=1e-9), (task, key)
    # cross-modal tasks really differ from uni-modal ones (different archives are searched)
    assert result.tasks["s1s2"].f1 != result.tasks["s1s1"].f1
    assert not any(r.map_uninformative for r in result.tasks.values())  # some archive items share no label
    out = result.to_dict()
    json.dumps(out)
    assert out["random_init"] is False and "warning" not in out
    assert out["provenance"]["checkpoint_sha256"] == "feedbeef"
    rows = result.table_rows()
    assert rows[0] == ["metric (%)", "S1S1", "S2S2", "S1S2", "S2S1"]
    assert rows[1][1] == f"{100 * result.tasks['s1s1'].f1:.2f}"


def test_evaluate_pair_subset_and_random_init_flag(tmp_path):
    path = tmp_path / "store.zarr"
    make_pair_store(path, prov=dict(PROV, checkpoint_sha256="random-init"))
    subset = [f"pair{i}" for i in range(0, 80, 2)]
    result = evaluate(path, tasks=("s2s2",), k=5, pair_ids=subset)
    got = result.tasks["s2s2"]
    assert got.n_queries + got.n_archive == 40
    out = result.to_dict()
    assert out["random_init"] is True and "RANDOM-INIT" in out["warning"]
    assert any("RANDOM-INIT" in cell for row in result.table_rows() for cell in row)
    assert "RANDOM-INIT" in result.to_text().splitlines()[0]


def test_hand_worked_example():
    # labels over 4 classes; 2 queries, k = 2
    q = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], bool)
    r = np.array([
        [[1, 0, 0, 0], [1, 1, 1, 1]],  # q0: prec 1, 2/4; rec 1/2, 2/2
        [[0, 0, 1, 1], [1, 0, 0, 0]],  # q1: prec 1/2, 0; rec 1, 0
    ], bool)
    s = retrieval_scores(q, r)
    P = ((1 + 0.5) / 2 + (0.5 + 0) / 2) / 2  # 0.5
    R = ((0.5 + 1) / 2 + (1 + 0) / 2) / 2  # 0.625
    assert s["precision"] == pytest.approx(0.5, abs=1e-12) == P
    assert s["recall"] == pytest.approx(0.625, abs=1e-12) == R
    assert s["f1"] == pytest.approx(2 * 0.5 * 0.625 / 1.125, abs=1e-12)  # 0.5555...
    # AP@2 with >= 2 relevant items in the archive: q0 both relevant -> (1/1 + 2/2)/2 = 1;
    # q1 only the first -> (1/1)/2 = 0.5
    assert s["map"] == pytest.approx(0.75)
    # ... and if the archive holds only one item relevant to q1, retrieving it first is perfect
    assert retrieval_scores(q, r, n_relevant=np.array([5, 1]))["map"] == pytest.approx(1.0)
    # a relevant item only at rank 2: AP = (1/2)/min(2, R_q)
    s2 = retrieval_scores(q[1:], np.array([[[1, 0, 0, 0], [0, 0, 1, 0]]], bool), n_relevant=np.array([1]))
    assert s2["map"] == pytest.approx(0.5)
    assert retrieval_scores(q[1:], np.array([[[1, 0, 0, 0], [0, 0, 1, 0]]], bool), n_relevant=np.array([0]))["map"] == 0


def test_relevant_counts_per_label_set_equal_pairwise_counts():
    from rsretrieve.retrieval.metrics import relevant_counts

    rng = np.random.default_rng(3)
    q = rng.random((50, 19)) < 0.15
    a = rng.random((300, 19)) < 0.15
    q[0] = False  # a query without labels has no relevant item
    expect = ((q.astype(int) @ a.T.astype(int)) > 0).sum(axis=1)
    np.testing.assert_array_equal(relevant_counts(q, a), expect)


def test_f1_is_not_mean_of_per_query_f1():
    q = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)
    r = np.array([[[1, 0, 0, 0]], [[1, 1, 1, 1]]], bool)  # q0: P=1 R=1/2; q1: P=1/4 R=1
    s = retrieval_scores(q, r)
    P, R = (1 + 0.25) / 2, (0.5 + 1) / 2
    assert s["f1"] == pytest.approx(2 * P * R / (P + R))
    f1s = per_query_f1(q, r)
    assert f1s == pytest.approx([2 / 3, 0.4])
    assert s["f1_macro"] == pytest.approx(f1s.mean())  # both definitions are reported, labelled
    assert abs(s["f1"] - f1s.mean()) > 0.1  # 0.6818 vs 0.5333


def test_zero_over_zero_is_zero_and_random_against_reference():
    rng = np.random.default_rng(5)
    q = rng.random((40, 19)) < 0.2
    r = rng.random((40, 7, 19)) < 0.2
    q[0] = False  # empty query labels, and an empty retrieved item: defined as 0, not NaN
    r[1, 0] = False
    s = retrieval_scores(q, r)
    ref = reference_scores(q.tolist(), r.tolist())
    for key in ("precision", "recall", "f1", "map", "f1_macro"):
        assert s[key] == pytest.approx(ref[key], abs=1e-12)
        assert np.isfinite(s[key])


def test_shape_errors():
    with pytest.raises(ValueError):
        retrieval_scores(np.zeros((2, 19), bool), np.zeros((3, 10, 19), bool))
