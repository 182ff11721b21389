"""Golden retrieval scores on fixed embeddings, computed by CSMAE's own `retrieval.py` (jakhac/CSMAE)
and, for mAP@k (which retrieval.py does not compute), by the `mapk` of Ben Hamner's `ml_metrics`
(benhamner/Metrics, the Kaggle reference rsretrieve's metrics docstring cites).

What it runs (both read from their checkouts at generation time, never copied into rsretrieve):
- CSMAE's `retrieval.py` `main(model_id, device)`, unchanged, in a scratch folder holding
  `trained_models/<model_id>/args.yaml` and a `.ckpt`, as it expects. Its inputs are replaced, not
  its computation: the backbone (`src.csmae_backbone.vit_*`) is a module without weights that
  returns the fixed embeddings it is fed ({"s1": first half, "s2": second half}); `BENDataSet`
  serves the fixed embeddings and multi-hot labels (float32, like CSMAE's `ben19_list_to_onehot`)
  of its split ("val" -> the validation rows, "test" -> the test rows); the augmentations are
  identities (retrieval.py switches off all but normalisation anyway). What runs as written:
  its DataLoaders (batch size 16, so batches do not align with the splits), `get_features_lists`,
  `faiss.normalize_L2`, `faiss.IndexFlatL2` search with k = 10 for the four tasks, and its
  precision / recall / F1 loop. Its `results` dict is taken from its `pprint.pprint` call, the
  top-k ids of each task from its `index.search` (an `IndexFlatL2` subclass that records them).
- Two shims for a machine without a GPU: `torch.cuda.set_device` does nothing, and the tensors the
  loader yields stay on the CPU when retrieval.py moves them to "cuda:0".
- mAP@k: `ml_metrics/average_precision.py` `mapk(actual, predicted, k)` per task, with `actual` the
  test items sharing a label with the query (relevance as rsretrieve defines it) and `predicted`
  CSMAE's top-k ids.

The data: 19-class labels (>= 1 each, as BigEarthNet's), embeddings of dimension 16 that depend on
the labels (plus noise) so that the scores are far from chance, 37 validation, 113 test and 20
train pairs (the train rows are in the file for rsretrieve's split selection; CSMAE never sees
them). The seed is the first from `--seed` whose rankings have no near-ties (a gap of at least
1e-4 in squared L2 between consecutive ranks 1..11 of every query in every task), so that float
rounding cannot reorder them.

Outputs in `--out`: `golden.npz` (embeddings, labels, splits, CSMAE's top-k ids, the scores) and
`golden.json` (the scores, commits, versions and this command).

Environment: rsretrieve's own venv plus what retrieval.py imports at its top (omegaconf, tqdm):

    python3.11 -m venv .venv-golden
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-golden/lib/python3.11/site-packages/rsretrieve-venv.pth
    .venv-golden/bin/pip install omegaconf==2.3.0 tqdm
    .venv-golden/bin/python tools/golden/make_retrieval_golden.py --csmae /path/to/CSMAE \\
        --metrics /path/to/benhamner/Metrics --out tests/data/retrieval

`--csmae` and `--metrics` take a checkout or a bare git directory (its HEAD is exported).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np

N_VAL, N_TEST, N_TRAIN, DIM, N_LABELS, K, BATCH = 37, 113, 20, 16, 19, 10, 16
MODEL_ID = "golden00"
TASKS = ("s1s1", "s2s2", "s1s2", "s2s1")


def checkout(path: Path, tmp: Path) -> tuple[Path, str]:
    """(a folder with the files of HEAD, its commit) for a checkout or a bare git directory."""
    git = ["git", "--git-dir", str(path / ".git" if (path / ".git").exists() else path)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if (path / ".git").exists():
        return path, commit
    folder = tmp / commit
    folder.mkdir()
    archive = subprocess.run([*git, "archive", "--format=tar", "HEAD"], capture_output=True, check=True).stdout
    tar = tmp / f"{commit}.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(folder, filter="data")
    return folder, commit


def make_data(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = N_VAL + N_TEST + N_TRAIN
    labels = rng.random((n, N_LABELS)) < 0.12
    labels[np.arange(n), rng.integers(0, N_LABELS, n)] = True
    split = np.array(["validation"] * N_VAL + ["test"] * N_TEST + ["train"] * N_TRAIN)
    perm = rng.permutation(n)  # the splits interleaved, as in a store
    labels, split = labels[perm], split[perm]
    emb = {}
    for modality in ("s1", "s2"):
        proj = rng.standard_normal((N_LABELS, DIM))
        emb[modality] = (labels @ proj + 1.5 * rng.standard_normal((n, DIM))).astype(np.float32)
    return {"labels": labels, "split": split, "s1": emb["s1"], "s2": emb["s2"]}


def no_near_ties(data: dict) -> bool:
    val, test = data["split"] == "validation", data["split"] == "test"
    for source, target in itertools.product(("s1", "s2"), repeat=2):
        q = data[source][val] / np.linalg.norm(data[source][val], axis=1, keepdims=True)
        a = data[target][test] / np.linalg.norm(data[target][test], axis=1, keepdims=True)
        d = np.sort(((q[:, None, :] - a[None, :, :]) ** 2).sum(-1), axis=1)[:, : K + 1]
        if np.diff(d, axis=1).min() < 1e-4:
            return False
    return True


def fake_csmae_modules(data: dict, torch) -> None:
    """`src.*` modules retrieval.py imports: its model, data set and augmentations, as inputs."""

    class Host(torch.Tensor):
        def to(self, *args, **kwargs):  # no GPU here: retrieval.py's "cuda:N" leaves it on the CPU
            return self

    class Backbone(torch.nn.Module):
        def forward(self, x):
            x = x.as_subclass(torch.Tensor)
            return {"s1": x[:, :DIM], "s2": x[:, DIM:]}

    def vit(**kwargs):
        return Backbone()

    class BENDataSet(torch.utils.data.Dataset):
        def __init__(self, transform, root_dir, split_dir, split, max_img_idx=None, img_size=None):
            name = {"val": "validation", "test": "test"}[split]
            self.rows = np.flatnonzero(data["split"] == name)
            self.transform = transform

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, idx):
            row = self.rows[idx]
            both = np.concatenate([data["s1"][row], data["s2"][row]])
            img = self.transform(torch.from_numpy(both).as_subclass(Host))
            return idx, img, torch.from_numpy(data["labels"][row].astype(np.float32))

    identity = lambda *args, **kwargs: (lambda x: x)  # noqa: E731
    modules = {
        "src": types.ModuleType("src"),
        "src.augmentations": types.SimpleNamespace(
            build_transform_pipeline=identity,
            NCropAugmentation=lambda pipeline, num_crops: pipeline,
            FullTransformPipeline=lambda pipelines: (lambda x: [p(x) for p in pipelines]),
        ),
        "src.bigearthnet_dataset": types.ModuleType("src.bigearthnet_dataset"),
        "src.bigearthnet_dataset.BEN_DataModule_LMDB_Encoder": types.SimpleNamespace(BENDataSet=BENDataSet),
        "src.utils": types.SimpleNamespace(Messages=types.SimpleNamespace(hint=print)),
        "src.csmae_backbone": types.SimpleNamespace(vit_tiny=vit, vit_small=vit, vit_base=vit, vit_large=vit),
    }
    sys.modules.update(modules)


def run_csmae(csmae: Path, data: dict, scratch: Path) -> tuple[dict, dict]:
    """({task: {prec, rec, f1}}, {task: top-k test-row positions}) from CSMAE's retrieval.main."""
    import faiss
    import torch
    from omegaconf import OmegaConf

    fake_csmae_modules(data, torch)
    model_dir = scratch / "trained_models" / MODEL_ID
    model_dir.mkdir(parents=True)
    aug = {"rrc": {"enabled": True}, "horizontal_flip": {"prob": 0.5}, "vertical_flip": {"prob": 0.5}, "num_crops": 1}
    OmegaConf.save(OmegaConf.create({
        "backbone": {"name": "vit_base", "kwargs": {}},
        "augmentations": [aug],
        "data": {"dataset": "bigearthnet", "root_dir": "unused", "split_dir": "unused", "num_bands": 12,
                 "img_size": 120, "num_workers": 0},
        "optimizer": {"batch_size": BATCH},
    }), model_dir / "args.yaml")
    torch.save({"state_dict": {}}, model_dir / "weights.ckpt")

    searches = []

    class RecordingFlatL2(faiss.IndexFlatL2):
        def search(self, x, k, *args, **kwargs):
            distances, ids = super().search(x, k, *args, **kwargs)
            searches.append(np.array(ids))
            return distances, ids

    spec = importlib.util.spec_from_file_location("csmae_retrieval", csmae / "retrieval.py")
    retrieval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(retrieval)
    printed = []
    retrieval.pprint = types.SimpleNamespace(pprint=printed.append)
    torch.cuda.set_device = lambda device: None
    faiss.IndexFlatL2 = RecordingFlatL2
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        retrieval.main(MODEL_ID, 0)
    finally:
        os.chdir(cwd)
    (results,) = printed
    order = [f"{a}_{b}" for a, b in itertools.product(["s1", "s2"], repeat=2)]  # retrieval.py's loop order
    assert list(results) == order and len(searches) == 4, (list(results), len(searches))
    scores = {name.replace("_", ""): {key: float(value) for key, value in results[name].items()} for name in order}
    topk = {name.replace("_", ""): ids for name, ids in zip(order, searches)}
    return scores, topk


def run_mapk(metrics: Path, data: dict, topk: dict) -> dict:
    spec = importlib.util.spec_from_file_location("ml_metrics_average_precision", metrics / "Python" / "ml_metrics" / "average_precision.py")
    average_precision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(average_precision)
    val, test = data["labels"][data["split"] == "validation"], data["labels"][data["split"] == "test"]
    actual = [[j for j in range(len(test)) if (q & test[j]).any()] for q in val]
    return {task: float(average_precision.mapk(actual, [list(map(int, line)) for line in ids], K)) for task, ids in topk.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csmae", type=Path, required=True, help="jakhac/CSMAE: a checkout or a bare git directory")
    ap.add_argument("--metrics", type=Path, required=True, help="benhamner/Metrics: a checkout or a bare git directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="the first seed tried")
    args = ap.parse_args()
    import faiss
    import omegaconf
    import torch

    seed = next(s for s in itertools.count(args.seed) if no_near_ties(make_data(s)))
    data = make_data(seed)
    with tempfile.TemporaryDirectory() as tmp:
        csmae, csmae_commit = checkout(args.csmae.resolve(), Path(tmp))
        metrics, metrics_commit = checkout(args.metrics.resolve(), Path(tmp))
        scratch = Path(tmp) / "scratch"
        scratch.mkdir()
        scores, topk = run_csmae(csmae, data, scratch)
        mapk = run_mapk(metrics, data, topk)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "golden.npz", labels=data["labels"], split=data["split"], s1=data["s1"], s2=data["s2"],
        **{f"topk_{task}": ids.astype(np.int64) for task, ids in topk.items()},
    )
    golden = {
        "what": "CSMAE retrieval.py's prec/rec/f1 (k=10, queries: validation, archive: test) on the fixed embeddings in "
                "golden.npz, and ml_metrics mapk on CSMAE's top-k ids (relevant: shares a label with the query)",
        "k": K,
        "scores": {task: {**scores[task], "map": mapk[task]} for task in TASKS},
        "topk": "golden.npz topk_<task>: row positions among the test rows, in store order, ranked by CSMAE's IndexFlatL2",
        "seed": seed,
        "csmae_commit": csmae_commit,
        "metrics_commit": metrics_commit,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                     "faiss": faiss.__version__, "omegaconf": omegaconf.__version__},
        "command": "python tools/golden/make_retrieval_golden.py --csmae <CSMAE> --metrics <benhamner/Metrics> --out tests/data/retrieval",
    }
    (args.out / "golden.json").write_text(json.dumps(golden, indent=2) + "\n")
    print(json.dumps(golden["scores"], indent=2))


if __name__ == "__main__":
    main()
