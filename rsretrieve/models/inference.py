"""Running the encoder on normalised pixels: batching, the one resize per batch, CPU/CUDA."""

from __future__ import annotations

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.models.preprocessing import resize_batch
from rsretrieve.provenance import RANDOM_INIT


def embed_pixels(model, pixels: np.ndarray, modality: Modality, device: str | None = None, batch_size: int = 32) -> np.ndarray:
    """Normalised (N, C, H, W) pixels -> raw [CLS] embeddings (N, D) float32, in batches.

    Each batch is resized to the model's input size once, on the device (pinned and copied
    asynchronously to a GPU), then run by `csmoe.encode` (inference mode; bf16 autocast on CUDA)."""
    import torch

    from rsretrieve.models.csmoe import encode

    device = device or str(next(model.parameters()).device)
    out = []
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size], dtype=np.float32))
        if device.startswith("cuda"):
            x = x.pin_memory().to(device, non_blocking=True)
        with torch.inference_mode():
            x = resize_batch(x, model.config.img_size)
        out.append(encode(model, x, modality, device).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.embed_dim), np.float32)


def describe_model(spec: str) -> tuple[dict, int]:
    """(provenance, embedding dim) of a model spec, without building a registered model's weights.

    A checkpoint path is loaded once (its sha256 and config are in the file)."""
    from pathlib import Path

    from rsretrieve.models.registry import REGISTRY, get_config

    if spec in REGISTRY and not Path(spec).exists():
        config = get_config(spec)
        provenance = {"model": spec, "config": config.to_dict(), "checkpoint_sha256": RANDOM_INIT, "checkpoint_path": None}
        return provenance, config.embed_dim
    from rsretrieve.models.checkpoint import load_model

    model = load_model(spec)
    return dict(model.provenance), model.config.embed_dim


def model_for_provenance(provenance: dict, device: str = "cpu"):
    """The exact model that wrote a store: the same registered config with its deterministic
    random init, or the same checkpoint file (its sha256 must still match)."""
    import warnings
    from pathlib import Path

    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.errors import StoreError, located

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
    model = load_model(path, device=device)
    if model.provenance.get("checkpoint_sha256") != sha:
        raise StoreError(located(path, "checkpoint changed since the store was written (sha256 differs); re-encode or restore it"))
    return model
