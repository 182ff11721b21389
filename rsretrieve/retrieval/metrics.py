"""Multi-label retrieval scores, per the CSMAE/CSMoE protocol (REFERENCE.md section 2).

For a query q and each of its k retrieved items r (multi-hot label vectors over the 19 classes):

    prec(q, r) = |q AND r| / |r|        rec(q, r) = |q AND r| / |q|

0/0 is defined as 0 (a retrieved item without labels contributes precision 0; a query without
labels contributes recall 0). BigEarthNet patches always carry at least one label, so this never
changes a BigEarthNet score; CSMAE's retrieval.py would produce NaN there.

    P = mean over queries of (mean over the k retrieved of prec)
    R = mean over queries of (mean over the k retrieved of rec)
    F1 = 2 P R / (P + R)            (harmonic mean of the averages: the number CSMAE's
                                     retrieval.py prints and the CSMoE paper's tables report;
                                     0 if P + R = 0)
    F1 macro = mean over queries of 2 P_q R_q / (P_q + R_q)   (per-query F1, as several papers
                                     report it; `f1_macro`)

`f1_pairwise` (the mean over query-item pairs, which CSMAE accumulates but does not report) is
kept for information.

mAP@k, the standard definition of average precision over the top k (e.g. Manning, Raghavan and
Schütze, *Introduction to Information Retrieval*, ch. 8.4, cut at k and normalised as in the
`apk` of Kaggle's ml_metrics): an archive item is relevant if it shares at least one label with
the query; with rel_i for the i-th retrieved item and P@i the precision of the first i,

    AP@k = sum_{i=1..k} rel_i * P@i / min(k, R_q),     R_q = relevant items in the whole archive

(AP@k = 0 when R_q = 0), and mAP@k is the mean over queries. CSMAE's retrieval.py computes no
mAP. Without R_q (`n_relevant=None`) the archive is taken to hold at least k relevant items per
query, i.e. AP@k is normalised by k.
"""

from __future__ import annotations

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=np.broadcast_to(den, out.shape) > 0)
    return out


def relevant_counts(query_labels: np.ndarray, archive_labels: np.ndarray) -> np.ndarray:
    """(Q,) int: archive items sharing at least one label with each query. Computed per distinct
    label set (BigEarthNet has a few thousand), not per query-item pair, so it scales to the
    full archives."""
    q = np.asarray(query_labels, dtype=bool)
    a = np.asarray(archive_labels, dtype=bool)
    bits = np.left_shift(np.int64(1), np.arange(q.shape[1], dtype=np.int64))
    a_sets, a_counts = np.unique(a.astype(np.int64) @ bits, return_counts=True)
    q_sets, inverse = np.unique(q.astype(np.int64) @ bits, return_inverse=True)
    per_set = ((q_sets[:, None] & a_sets[None, :]) != 0) @ a_counts
    return per_set[inverse.reshape(-1)].astype(np.int64)


def retrieval_scores(query_labels: np.ndarray, retrieved_labels: np.ndarray, n_relevant: np.ndarray | None = None) -> dict:
    """query_labels (Q, L) bool, retrieved_labels (Q, k, L) bool, n_relevant (Q,) the relevant
    items in the archive (`relevant_counts`) -> dict with precision, recall, f1, f1_macro, map
    (mAP@k), f1_pairwise, n_queries, k. Values are fractions (not %)."""
    q = np.asarray(query_labels, dtype=bool)
    r = np.asarray(retrieved_labels, dtype=bool)
    if q.ndim != 2 or r.ndim != 3 or r.shape[0] != q.shape[0] or r.shape[2] != q.shape[1]:
        raise ValueError(f"expected query labels (Q, L) and retrieved labels (Q, k, L); got {q.shape} and {r.shape}")
    n_queries, k = r.shape[0], r.shape[1]
    if n_queries == 0 or k == 0:
        raise ValueError("retrieval scores need at least one query and k >= 1")
    common = np.einsum("ql,qkl->qk", q.astype(np.int64), r.astype(np.int64))  # |q AND r|
    prec = _ratio(common, r.sum(axis=2))  # (Q, k)
    rec = _ratio(common, q.sum(axis=1)[:, None])  # (Q, k)
    precision = float(prec.mean(axis=1).mean())
    recall = float(rec.mean(axis=1).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    pair_f1 = _ratio(2 * prec * rec, prec + rec)
    relevant = common > 0
    hits = np.cumsum(relevant, axis=1)
    precision_at_i = hits / np.arange(1, k + 1)[None, :]
    depth = np.full(n_queries, k) if n_relevant is None else np.minimum(k, np.asarray(n_relevant))
    ap = _ratio((precision_at_i * relevant).sum(axis=1), depth)
    return {
        "precision": precision,
        "recall": recall,
        "f1": float(f1),
        "f1_macro": float(_ratio(2 * prec.mean(axis=1) * rec.mean(axis=1), prec.mean(axis=1) + rec.mean(axis=1)).mean()),
        "map": float(ap.mean()),
        "f1_pairwise": float(pair_f1.mean()),
        "n_queries": int(n_queries),
        "k": int(k),
    }


def per_query_f1(query_labels: np.ndarray, retrieved_labels: np.ndarray) -> np.ndarray:
    """F1 of each query's own averages (diagnostic; its mean is not the reported F1)."""
    q = np.asarray(query_labels, dtype=bool)
    r = np.asarray(retrieved_labels, dtype=bool)
    common = np.einsum("ql,qkl->qk", q.astype(np.int64), r.astype(np.int64))
    p = _ratio(common, r.sum(axis=2)).mean(axis=1)
    rc = _ratio(common, q.sum(axis=1)[:, None]).mean(axis=1)
    return _ratio(2 * p * rc, p + rc)
