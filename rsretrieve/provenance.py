"""What identifies a set of embeddings: the model, its config and weights, and the preprocessing
that turned raw pixels into its input. Stores, indexes, queries and evaluations all compare
provenance the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence

RANDOM_INIT = "random-init"  # the checkpoint_sha256 of a model with untrained weights

# provenance keys that must agree before embeddings may share a store or an index
IDENTITY_KEYS = ("model", "config", "checkpoint_sha256", "dtype", "preprocessing", "precision")
MODEL_KEYS = ("model", "config", "checkpoint_sha256", "preprocessing")  # what a store's S1 and S2 share
# what a store group was made from (its provenance["dataset"]): it serves that data and no other
DATASET_KEYS = ("name", "root", "subset", "options", "patches_sha256")
# the compute precision of embeddings recorded before it was (every earlier store: the GPU path had never run)
DEFAULT_PRECISION = "float32"


def is_random_init(provenance: dict | None) -> bool:
    """Whether embeddings come from untrained weights (their scores are not results)."""
    return bool(provenance) and provenance.get("checkpoint_sha256") == RANDOM_INIT


def identity(provenance: dict | None, keys: Sequence[str] = IDENTITY_KEYS) -> dict:
    """The identity of some embeddings, as stored (JSON round trip: tuples compare as lists)."""
    provenance = {**(provenance or {}), "precision": stored_precision(provenance)}
    return {key: json.loads(json.dumps(provenance.get(key), default=str)) for key in keys}


def stored_precision(provenance: dict | None) -> str:
    """The compute precision (float32, bfloat16, float16) some embeddings were computed at."""
    return (provenance or {}).get("precision") or DEFAULT_PRECISION


def differences(a: dict | None, b: dict | None, keys: Sequence[str] = IDENTITY_KEYS) -> list[str]:
    ia, ib = identity(a, keys), identity(b, keys)
    return [key for key in keys if ia[key] != ib[key]]


def dataset_differences(made_from: dict | None, asked: dict | None) -> list[str]:
    """The keys in which two datasets (provenance["dataset"]) differ: another root, subset, window
    rule or list of patches is other data."""
    return differences(made_from, asked, DATASET_KEYS)


def upsampling_differences(made: dict | None, asked: dict | None) -> list[str]:
    """["reader.coarse"] when a store's embeddings (provenance `made`) and those asked differ only
    in who upsampled the 20 m bands of odd Major TOM windows: stores written before the reader
    recorded `coarse: "model"` hold its nearest upsampling there (whole tiles of the default
    windows), which equals the model's own only when that is nearest too."""
    old = ((made or {}).get("dataset") or {}).get("reader") or {}
    new = ((asked or {}).get("dataset") or {}).get("reader") or {}
    upsample = ((asked or {}).get("preprocessing") or {}).get("upsample", "nearest")
    stale = (new.get("coarse") == "model" and old.get("coarse") != "model" and old.get("windows") not in (None, "grid")
             and upsample != "nearest")  # the grid's windows are all on the 20 m grid: nothing was upsampled by the reader
    return ["reader.coarse"] if stale else []


def describe_dataset(dataset: dict | None) -> str:
    """'benv2 / BENv2-14k at /data/benv2 (options {...})' from provenance["dataset"]."""
    dataset = dataset or {}
    subset = f" / {dataset['subset']}" if dataset.get("subset") else ""
    root = f" at {dataset['root']}" if dataset.get("root") else ""
    options = f" (options {dataset['options']})" if dataset.get("options") else ""
    return f"{dataset.get('name')}{subset}{root}{options}"


def describe(provenance: dict | None) -> str:
    provenance = provenance or {}
    sha = str(provenance.get("checkpoint_sha256", "?"))
    return f"{provenance.get('model')} ({'random-init' if sha == RANDOM_INIT else 'sha256 ' + sha[:12]})"


def describe_weights(model: str, source: dict) -> str:
    """'csmae-p15 (CSMAE checkpoint, csmae_sesd, decoder specific)' from a store's provenance."""
    source = source.get("converted_from", source)
    if source.get("format") == "csmae-lightning":
        variant = source.get("variant") or "not one of the four published configurations"
        return f"{model} (CSMAE checkpoint: {variant}, decoder {source.get('decoder')}, vector {source.get('vector')})"
    return f"{model} ({source.get('format', 'registered config')})"


def describe_preprocessing(p: dict) -> str:
    if not p:
        return "unknown (store written before preprocessing was recorded)"
    transposed = ", H/W transposed" if p.get("transpose") else ""
    return (f"{p.get('name')} ({p.get('stats_source')}; 20 m bands {p.get('upsample')}; resize {p.get('resize')}{transposed}; "
            f"S2 {' '.join(p.get('s2_bands', []))}; S1 {' '.join(p.get('s1_bands', []))})")
