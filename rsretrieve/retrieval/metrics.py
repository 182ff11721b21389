"""Multi-label retrieval scores, per the CSMAE/CSMoE protocol (REFERENCE.md section 2).

For a query q and each of its k retrieved items r (multi-hot label vectors over the 19 classes):

    prec(q, r) = |q AND r| / |r|        rec(q, r) = |q AND r| / |q|

0/0 is defined as 0 (a retrieved item without labels contributes precision 0; a query without
labels contributes recall 0). BigEarthNet patches always carry at least one label, so this never
changes a BigEarthNet score; CSMAE's retrieval.py would produce NaN there.

    P = mean over queries of (mean over the k retrieved of prec)
    R = mean over queries of (mean over the k retrieved of rec)
    F1 = 2 P R / (P + R)            (harmonic mean of the averages — the number CSMAE reports;
                                     NOT the mean of per-query or per-pair F1s, given as
                                     `f1_pairwise` for information only; 0 if P + R = 0)

mAP@k (CSMAE's retrieval.py computes no mAP; this is ours): an item is relevant if it shares at
least one label with the query. For each query,

    AP@k = (1 / n_rel) * sum_{i=1..k} rel_i * (sum_{j<=i} rel_j) / i

where n_rel = number of relevant items among the top k (AP@k = 0 if none is relevant), and
mAP@k is the mean of AP@k over queries.
"""

from __future__ import annotations

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=np.broadcast_to(den, out.shape) > 0)
    return out


def retrieval_scores(query_labels: np.ndarray, retrieved_labels: np.ndarray) -> dict:
    """query_labels (Q, L) bool, retrieved_labels (Q, k, L) bool -> dict with precision, recall,
    f1, map (mAP@k), f1_pairwise, n_queries, k. Values are fractions (not %)."""
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
    ap = _ratio((precision_at_i * relevant).sum(axis=1), relevant.sum(axis=1))
    return {
        "precision": precision,
        "recall": recall,
        "f1": float(f1),
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
