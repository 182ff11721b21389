"""Retrieval: FAISS indexes per modality, queries against an archive, the paper's F1 evaluation.

    archive = Archive.open("stores/sample--csmoe-p16.zarr", indexes_dir="indexes")
    result = archive.query_tile("tile.tif", target="s2", k=10)
    scores = evaluate("stores/sample--csmoe-p16.zarr", k=10)
"""

from rsretrieve.retrieval import ondisk_index  # noqa: F401  (registers the on-disk index kind with faiss_index.ON_DISK)
from rsretrieve.retrieval.archive import Archive, Hit, QueryResult, short_id
from rsretrieve.retrieval.evaluate import TASKS, EvalResult, TaskResult, evaluate
from rsretrieve.retrieval.faiss_index import KINDS, EmbeddingIndex, recall_at_k
from rsretrieve.retrieval.index_meta import index_dir, index_is_current, read_meta
from rsretrieve.retrieval.metrics import per_query_f1, retrieval_scores

__all__ = [
    "KINDS",
    "TASKS",
    "Archive",
    "EmbeddingIndex",
    "EvalResult",
    "Hit",
    "QueryResult",
    "TaskResult",
    "evaluate",
    "index_dir",
    "index_is_current",
    "per_query_f1",
    "read_meta",
    "recall_at_k",
    "retrieval_scores",
    "short_id",
]
