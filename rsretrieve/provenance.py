"""What identifies a set of embeddings: the model, its config and weights, and how pixels were
normalised. Stores, indexes, queries and evaluations all compare provenance the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence

RANDOM_INIT = "random-init"  # the checkpoint_sha256 of a model with untrained weights

# provenance keys that must agree before embeddings may share a store or an index
IDENTITY_KEYS = ("model", "config", "checkpoint_sha256", "dtype", "normalisation")
MODEL_KEYS = ("model", "config", "checkpoint_sha256")  # what must agree between a store's S1 and S2


def is_random_init(provenance: dict | None) -> bool:
    """Whether embeddings come from untrained weights (their scores are not results)."""
    return bool(provenance) and provenance.get("checkpoint_sha256") == RANDOM_INIT


def identity(provenance: dict | None, keys: Sequence[str] = IDENTITY_KEYS) -> dict:
    """The identity of some embeddings, as stored (JSON round trip: tuples compare as lists)."""
    provenance = provenance or {}
    return {key: json.loads(json.dumps(provenance.get(key), default=str)) for key in keys}


def differences(a: dict | None, b: dict | None, keys: Sequence[str] = IDENTITY_KEYS) -> list[str]:
    ia, ib = identity(a, keys), identity(b, keys)
    return [key for key in keys if ia[key] != ib[key]]


def describe(provenance: dict | None) -> str:
    provenance = provenance or {}
    sha = str(provenance.get("checkpoint_sha256", "?"))
    return f"{provenance.get('model')} ({'random-init' if sha == RANDOM_INIT else 'sha256 ' + sha[:12]})"
