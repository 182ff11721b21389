"""Retrieval scores against numbers computed by others' code, not by this project's own loops.

`tests/data/retrieval/` was made by `tools/golden/make_retrieval_golden.py`: CSMAE's own
`retrieval.py` (precision, recall, F1 at k = 10) and the `mapk` of Ben Hamner's `ml_metrics`
(mAP@k) on fixed embeddings and labels; golden.json says exactly what ran."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from rsretrieve.retrieval.evaluate import TASKS, evaluate
from rsretrieve.retrieval.metrics import relevant_counts, retrieval_scores

DATA = Path(__file__).resolve().parent / "data" / "retrieval"
GOLDEN = json.loads((DATA / "golden.json").read_text())
ARRAYS = np.load(DATA / "golden.npz")
NAMES = {"precision": "prec", "recall": "rec", "f1": "f1", "map": "map"}  # rsretrieve's -> golden.json's


def test_the_golden_is_what_its_script_says():
    assert GOLDEN["k"] == 10 and set(GOLDEN["scores"]) == set(TASKS)
    labels, split = ARRAYS["labels"], ARRAYS["split"]
    assert labels.sum(axis=1).min() >= 1  # CSMAE's F1 is NaN for an item without labels
    assert {s: int((split == s).sum()) for s in ("validation", "test", "train")} == {"validation": 37, "test": 113, "train": 20}
    # the F1 CSMAE reports is the harmonic mean of the averages (not the mean of per-query F1s)
    for task, scores in GOLDEN["scores"].items():
        assert scores["f1"] == pytest.approx(2 * scores["prec"] * scores["rec"] / (scores["prec"] + scores["rec"]), rel=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_scores_on_csmae_rankings_equal_csmae_and_ml_metrics(task):
    """rsretrieve's metrics on CSMAE's own top-k: the numbers retrieval.py printed, and mapk's."""
    labels, split = ARRAYS["labels"].astype(bool), ARRAYS["split"]
    queries, archive = labels[split == "validation"], labels[split == "test"]
    top = ARRAYS[f"topk_{task}"]
    got = retrieval_scores(queries, archive[top], relevant_counts(queries, archive))
    for ours, theirs in NAMES.items():
        assert got[ours] == pytest.approx(GOLDEN["scores"][task][theirs], rel=1e-12, abs=1e-15), (task, ours)


def golden_store(path: Path) -> None:
    """The golden's pairs as an rsretrieve store: both groups, the rows in the file's order."""
    n = len(ARRAYS["split"])
    for modality in ("s1", "s2"):
        ds = xr.Dataset(
            {"embedding": (("patch", "dim"), ARRAYS[modality])},
            coords={
                "patch_id": ("patch", np.array([f"{modality}_{i}" for i in range(n)], dtype=object)),
                "pair_id": ("patch", np.array([f"pair{i}" for i in range(n)], dtype=object)),
                "split": ("patch", ARRAYS["split"].astype(object)),
                "labels": (("patch", "label"), ARRAYS["labels"].astype(bool)),
                "label": ("label", np.array([f"c{i}" for i in range(ARRAYS["labels"].shape[1])], dtype=object)),
            },
        )
        ds.attrs["provenance"] = {"model": "golden", "config": {}, "checkpoint_sha256": "golden", "dtype": "float32"}
        ds.to_zarr(path, group=modality, mode="w", zarr_format=3, consolidated=False)


def test_evaluate_on_the_golden_store_equals_csmae_and_ml_metrics(tmp_path):
    """End to end: splits chosen, vectors normalised, the archive searched, scored: all four tasks."""
    golden_store(tmp_path / "store.zarr")
    result = evaluate(tmp_path / "store.zarr", k=10)
    for task in TASKS:
        got = result.tasks[task]
        assert (got.n_queries, got.n_archive) == (37, 113)
        for ours, theirs in NAMES.items():
            assert getattr(got, ours) == pytest.approx(GOLDEN["scores"][task][theirs], rel=1e-9), (task, ours)
