"""Running the encoder on raw reader values: the model's preprocessing and the forward pass, on
its device, in batches. Archive chunks, query tiles and evaluations all come through here, so a
query embeds exactly as the archive did."""

from __future__ import annotations

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.preprocess import RawPixels
from rsretrieve.provenance import RANDOM_INIT


def embed_raw(model, raw: RawPixels, modality: Modality, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Raw pixels of N patches -> retrieval vectors (N, D) float32, `batch_size` at a time.

    Each batch goes to the device as raw values (uint16 S2 digital numbers, float32 S1 dB), where
    `models.preprocessing.prepare` applies the model's preprocessing; then `csmoe.encode` runs it
    (inference mode; bf16 autocast on CUDA)."""
    import torch

    from rsretrieve.models.csmoe import encode
    from rsretrieve.models.preprocessing import prepare

    device = device or str(next(model.parameters()).device)
    config = model.config
    out = []
    for start in range(0, len(raw), batch_size):
        with torch.inference_mode():
            x = prepare(raw.take(slice(start, start + batch_size)), modality, config.preprocessing, config.img_size, device)
        out.append(encode(model, x, modality, device).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, config.embed_dim), np.float32)


def describe_model(spec: str, config: str | None = None) -> tuple[dict, int]:
    """(provenance, embedding dim) of a model spec, without building a registered model's weights.

    A checkpoint path is loaded once (its sha256 and config are in the file)."""
    from pathlib import Path

    from rsretrieve.models.registry import REGISTRY, get_config

    if spec in REGISTRY and not Path(spec).exists():
        registered = get_config(spec)
        provenance = {"model": spec, "config": registered.to_dict(), "checkpoint_sha256": RANDOM_INIT, "checkpoint_path": None,
                      "preprocessing": registered.preprocessing.to_dict()}
        return provenance, registered.embed_dim
    from rsretrieve.models.checkpoint import load_model

    model = load_model(spec, config=config)
    return dict(model.provenance), model.config.embed_dim


def model_for_provenance(provenance: dict, device: str = "cpu"):
    """The exact model that wrote a store: the same registered config with its deterministic
    random init, or the same checkpoint file (its sha256 must still match)."""
    import warnings
    from pathlib import Path

    from rsretrieve.errors import StoreError, located
    from rsretrieve.models.checkpoint import load_model, sha256_file
    from rsretrieve.models.registry import CSMoEConfig

    sha = provenance.get("checkpoint_sha256")
    if sha == RANDOM_INIT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller stamps random-init results itself
            model = load_model(provenance["model"], device=device)
        if model.config.to_dict() != provenance.get("config"):
            raise StoreError(f"{provenance['model']}: the registered config changed since the store was written; re-encode")
        return model
    path = provenance.get("checkpoint_path")
    if not path or not Path(path).exists():
        raise StoreError(located(path, "the checkpoint this store was encoded with is missing; queries need the same model"))
    if sha256_file(path) != sha:
        raise StoreError(located(path, "checkpoint changed since the store was written (sha256 differs); re-encode or restore it"))
    return load_model(path, device=device, config=CSMoEConfig.from_dict(provenance["config"]))
