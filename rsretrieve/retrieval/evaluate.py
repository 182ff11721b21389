"""Retrieval evaluation over an embedding store, per the CSMAE/CSMoE protocol (Table VI).

Queries: the `query_split` (validation) embeddings of the query modality. Archive: the
`archive_split` (test) embeddings of the target modality. Exact cosine search by default (the
ranking CSMAE's retrieval.py uses), k = 10, scores from `rsretrieve.retrieval.metrics.retrieval_scores`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.retrieval.faiss_index import EmbeddingIndex
from rsretrieve.store.integrity import naming_damage
from rsretrieve.store.read import DEFAULT_BATCH, iter_embeddings, open_group, provenance_of, selection_mask
from rsretrieve.retrieval.metrics import relevant_counts, retrieval_scores
from rsretrieve.provenance import RANDOM_INIT, is_random_init

TASKS = ("s1s1", "s2s2", "s1s2", "s2s1")  # Table VI column order
RANDOM_INIT_WARNING = "RANDOM-INIT WEIGHTS: these embeddings come from an untrained model; the scores are NOT CSMoE results"


@dataclass
class TaskResult:
    task: str
    precision: float
    recall: float
    f1: float
    map: float
    n_queries: int
    n_archive: int
    k: int
    f1_pairwise: float = float("nan")
    f1_macro: float = float("nan")
    map_uninformative: bool = False  # every archive item is relevant to every query: mAP is 1 for any ranking

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    tasks: dict[str, TaskResult]
    k: int
    query_split: str
    archive_split: str
    index_kind: str
    provenance: dict = field(default_factory=dict)
    pair_subset: int | None = None
    gpu_notice: str | None = None  # with use_gpu: why the archives were searched on the CPU (`retrieval.gpu`)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def random_init(self) -> bool:
        return is_random_init(self.provenance)

    def to_dict(self) -> dict:
        out = {
            "random_init": self.random_init,
            "protocol": {
                "k": self.k,
                "query_split": self.query_split,
                "archive_split": self.archive_split,
                "ranking": "cosine on L2-normalised retrieval vectors (the model's: [CLS], or fc_norm(mean) for CSMAE)",
                "index_kind": self.index_kind,
                "f1": "2*P_avg*R_avg/(P_avg+R_avg): CSMAE's retrieval.py, the CSMoE paper's Table VI",
                "f1_macro": "mean over queries of 2*P_q*R_q/(P_q+R_q)",
                "map": "AP@k = sum_i rel_i*P@i / min(k, relevant items in the archive), relevant = shares a label",
                "pair_subset": self.pair_subset,
            },
            "tasks": {name: result.to_dict() for name, result in self.tasks.items()},
            "provenance": self.provenance,
            "created": self.created,
        }
        if self.random_init:
            out = {"warning": RANDOM_INIT_WARNING, **out}
        return out

    def table_rows(self) -> list[list[str]]:
        """Table VI layout: a header row, then one row per metric, tasks as columns
        (S1S1 S2S2 S1S2 S2S1), values in %. A random-init store adds a loud flag row."""
        names = [t for t in TASKS if t in self.tasks] + [t for t in self.tasks if t not in TASKS]
        header = ["metric (%)"] + [t.upper() for t in names]
        model = str(self.provenance.get("model", "?"))
        label = f"F1@{self.k} {model}" + (" [RANDOM-INIT]" if self.random_init else "")
        rows = [header]
        rows.append([label] + [f"{100 * self.tasks[t].f1:.2f}" for t in names])
        rows.append([f"F1@{self.k} macro (per query)"] + [f"{100 * self.tasks[t].f1_macro:.2f}" for t in names])
        rows.append([f"P@{self.k}"] + [f"{100 * self.tasks[t].precision:.2f}" for t in names])
        rows.append([f"R@{self.k}"] + [f"{100 * self.tasks[t].recall:.2f}" for t in names])
        rows.append([f"mAP@{self.k}"] + [f"{100 * self.tasks[t].map:.2f}" for t in names])
        rows.append(["queries / archive"] + [f"{self.tasks[t].n_queries}/{self.tasks[t].n_archive}" for t in names])
        if self.random_init:
            rows.append(["!! RANDOM-INIT WEIGHTS — NOT A TRAINED MODEL !!"] + ["!!"] * len(names))
        return rows

    def to_text(self) -> str:
        rows = self.table_rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.random_init:
            lines.insert(0, RANDOM_INIT_WARNING)
        return "\n".join(lines)


def _open_groups(store, modalities: set[str]) -> dict:
    if isinstance(store, Mapping):
        missing = modalities - set(store)
        if missing:
            raise StoreError(f"no {', '.join(sorted(missing))} group given for evaluation")
        return {m: store[m] for m in modalities}
    if hasattr(store, "open") and hasattr(store, "path"):  # an rsretrieve.store.EmbeddingStore
        return {m: store.open(m) for m in modalities}
    path = Path(store)
    groups = {}
    for m in sorted(modalities):
        if not (path / m).exists():
            raise StoreError(located(path, f"has no {m.upper()} embeddings; evaluation needs both modalities for these tasks"))
        groups[m] = open_group(path, m)
    return groups


def _labels(ds) -> np.ndarray:
    if "labels" not in ds.variables:
        raise StoreError("the store group has no `labels`; retrieval scores need the 19-class labels")
    return np.asarray(ds["labels"].values, dtype=bool)


def evaluate(
    store,
    tasks: Sequence[str] = TASKS,
    k: int = 10,
    query_split: str = "validation",
    archive_split: str = "test",
    pair_ids: Sequence[str] | None = None,
    index_kind: str = "flat",
    batch_size: int = DEFAULT_BATCH,
    use_gpu: bool = True,
) -> EvalResult:
    """Score the retrieval tasks (each "<query modality><archive modality>", e.g. "s1s2") on a store
    path, an `EmbeddingStore`, or a mapping {"s1": Dataset, "s2": Dataset} of opened groups. Data
    that fails its checksum is an error naming the array, never a score."""
    where = None if isinstance(store, Mapping) else getattr(store, "path", store)
    with naming_damage(where) if where is not None else nullcontext():
        return _evaluate(store, tasks, k, query_split, archive_split, pair_ids, index_kind, batch_size, use_gpu)


def _evaluate(store, tasks, k, query_split, archive_split, pair_ids, index_kind, batch_size, use_gpu) -> EvalResult:
    tasks = tuple(t.lower() for t in tasks)
    for task in tasks:
        if len(task) != 4 or task[:2] not in ("s1", "s2") or task[2:] not in ("s1", "s2"):
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    groups = _open_groups(store, {t[:2] for t in tasks} | {t[2:] for t in tasks})
    provenance = _common_provenance(groups)
    pair_list = None if pair_ids is None else [str(p) for p in pair_ids]
    archives: dict[str, tuple[EmbeddingIndex, np.ndarray]] = {}
    results: dict[str, TaskResult] = {}
    for task in tasks:
        source, target = task[:2], task[2:]
        if target not in archives:
            ds = groups[target]
            index = EmbeddingIndex.build(ds, target, kind=index_kind, split=archive_split, pair_ids=pair_list,
                                         batch_size=batch_size, use_gpu=use_gpu)
            archives[target] = (index, _labels(ds))
        index, archive_labels = archives[target]
        qds = groups[source]
        qmask = selection_mask(qds, split=query_split, pair_ids=pair_list)
        if not qmask.any():
            raise StoreError(f"no {source.upper()} queries in the {query_split!r} split" + (" for the given pairs" if pair_list else ""))
        if k > index.ntotal:
            raise StoreError(f"k={k} is larger than the {target.upper()} archive ({index.ntotal} patches in the {archive_split!r} split)")
        query_labels = _labels(qds)
        q_parts, r_parts = [], []
        for rows, vectors in iter_embeddings(qds, qmask, batch_size):
            _, found = index.search(vectors, k)
            if (found < 0).any():
                raise StoreError(f"{task}: the {index.kind} index returned fewer than k={k} neighbours")
            q_parts.append(query_labels[rows])
            r_parts.append(archive_labels[found])
        queries = np.concatenate(q_parts)
        relevant = relevant_counts(queries, archive_labels[index.rows])
        scores = retrieval_scores(queries, np.concatenate(r_parts), relevant)
        results[task] = TaskResult(task, scores["precision"], scores["recall"], scores["f1"], scores["map"],
                                   scores["n_queries"], index.ntotal, k, scores["f1_pairwise"], scores["f1_macro"],
                                   bool((relevant == index.ntotal).all()))
    notices = [index.gpu_notice for index, _ in archives.values() if index.gpu_notice]
    return EvalResult(results, k, query_split, archive_split, index_kind, provenance,
                      None if pair_list is None else len(pair_list), notices[0] if notices else None)


def _common_provenance(groups: Mapping) -> dict:
    provs = {m: provenance_of(ds) for m, ds in groups.items()}
    first = next(iter(provs.values()))
    if all(p == first for p in provs.values()):
        return first
    # per-modality provenance differs (e.g. creation time); keep both, flag random-init if any is
    out = {"per_modality": provs}
    for key in ("model", "checkpoint_sha256"):
        values = {str(p.get(key)) for p in provs.values()}
        out[key] = RANDOM_INIT if key == "checkpoint_sha256" and RANDOM_INIT in values else "/".join(sorted(values))
    return out
