"""Exact scores from the stored vectors: an approximate index's shortlist re-ranked with the rows
read from the store (`RowReader`), and running top-k lists merged across slices of an archive.

    scores, rows = search_reranked(index, RowReader(group), queries, k=10, k_factor=3)
"""

from __future__ import annotations

import numpy as np

from rsretrieve.store.read import normalise_rows


class TopK:
    """Running exact top-k (inner product on unit vectors) of a few queries over streamed blocks."""

    def __init__(self, queries: np.ndarray | None, k: int):
        self.queries = None if queries is None else np.ascontiguousarray(queries, np.float32)
        self.k = k
        q = 0 if queries is None else len(queries)
        self.scores = None if queries is None else np.full((q, k), -np.inf, np.float32)
        self.rows = None if queries is None else np.full((q, k), -1, np.int64)

    def update(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if self.queries is None or not len(ids):
            return
        sims = self.queries @ vectors.T
        take = min(self.k, sims.shape[1])
        part = np.argpartition(sims, sims.shape[1] - take, axis=1)[:, -take:]  # no negated copy of sims
        self.scores, self.rows = merge_topk([(self.scores, self.rows), (np.take_along_axis(sims, part, axis=1), ids[part])], self.k)


def merge_topk(pairs, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores (Q, *), rows (Q, *)) per query, best first; ties by row."""
    scores = np.concatenate([s for s, _ in pairs], axis=1)
    rows = np.concatenate([r for _, r in pairs], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k] if scores.size else np.zeros((scores.shape[0], 0), np.int64)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def search_reranked(index, reader, queries: np.ndarray, k: int, k_factor: float, batch: int = 256,
                    search=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact cosine among each query's PQ shortlist of k * k_factor (`queries` normalised),
    the shortlist found by `search(queries, n)` (default `index.search`; `gpu.CoarseOnGpu.search`
    assigns the queries to lists on a GPU). Returns (scores (Q, k) float32, store rows (Q, k)
    int64; -inf / -1 where fewer were found)."""
    import faiss

    shortlist = int(min(max(k, round(k * k_factor)), faiss.extract_index_ivf(index).ntotal))
    _, candidates = (search or index.search)(np.ascontiguousarray(queries, np.float32), shortlist)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), batch):
        stop = min(start + batch, len(queries))
        scores[start:stop], rows[start:stop] = _rerank(reader, queries[start:stop], candidates[start:stop], k)
    return scores, rows


def _rerank(reader, queries: np.ndarray, candidates: np.ndarray, k: int, step: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of the candidates (each distinct row of the batch read once), best k first."""
    wanted = np.unique(candidates[candidates >= 0])
    if not wanted.size:
        return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
    vectors = normalise_rows(reader.read(wanted))
    at = np.minimum(np.searchsorted(wanted, np.clip(candidates, 0, None)), wanted.size - 1)
    exact = np.empty(candidates.shape, np.float32)
    for s in range(0, len(queries), step):  # each query with its own candidates: (step, shortlist, dim) at a time
        exact[s:s + step] = (vectors[at[s:s + step]] @ queries[s:s + step, :, None])[..., 0]
    exact = np.where(candidates >= 0, exact, -np.inf).astype(np.float32)
    return merge_topk([(exact, np.where(candidates >= 0, candidates, -1))], k)
