"""Running the encoder on raw reader values: the model's preprocessing and the forward pass, on
its device, in batches. Archive chunks, query tiles and evaluations all come through here, so a
query embeds exactly as the archive did."""

from __future__ import annotations

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.pixels import RawPixels
from rsretrieve.provenance import RANDOM_INIT


def embed_raw(model, raw: RawPixels, modality: Modality, device: str | None = None, batch_size: int = 32,
              fixed_shape: bool = False) -> np.ndarray:
    """Raw pixels of N patches -> retrieval vectors (N, D) float32, `batch_size` at a time.

    `fixed_shape` (a model compiled with static shapes): the last batch is padded to `batch_size`
    with copies of its last patch and the pad rows are dropped, so the model sees one shape per
    modality and compiles once, not again for every group's tail (each patch's vector depends on
    that patch alone: Soft MoE routes each sample on its own).

    Each batch goes to the device as raw values (uint16 S2 digital numbers, float32 S1 dB), where
    `models.preprocessing` applies the model's preprocessing; then `csmoe.encode` runs it
    (inference mode; bf16 on CUDA). On a GPU the next batch is copied (pinned, on a side stream)
    while the model works on this one, and the vectors come back once, at the end."""
    import torch

    from rsretrieve.models.csmoe import encode
    from rsretrieve.models.preprocessing import finish, upload

    device = torch.device(device or next(model.parameters()).device)
    config = model.config
    starts = list(range(0, len(raw), batch_size))
    if not starts:
        return np.zeros((0, config.embed_dim), np.float32)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def send(start: int):
        part = raw.take(slice(start, start + batch_size))
        if side is None:
            return upload(part, device)
        with torch.cuda.stream(side):
            return upload(part, device)

    out, pending = [], send(starts[0])
    for k in range(len(starts)):
        current = pending
        if side is not None:  # the copy must be done; and its memory kept until this stream used it
            torch.cuda.current_stream(device).wait_stream(side)
            for tensor in current.tensors():
                tensor.record_stream(torch.cuda.current_stream(device))
        pending = send(starts[k + 1]) if k + 1 < len(starts) else None
        with torch.inference_mode():
            x = finish(current, modality, config.preprocessing, config.img_size)
            n = x.shape[0]
            if fixed_shape and n < batch_size:
                x = torch.cat([x, x[-1:].expand(batch_size - n, *x.shape[1:])])
            out.append(encode(model, x, modality, device)[:n])
    return torch.cat(out).cpu().numpy()


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
    """The exact model that wrote a store, at the precision it computed in: the same registered
    config with its deterministic random init, or the same checkpoint file (its sha256 must still
    match). bfloat16 runs on the CPU too, so a query embeds as a GPU-encoded archive did."""
    from rsretrieve.models.csmoe import to_inference_dtype
    from rsretrieve.provenance import stored_precision

    return to_inference_dtype(_stored_model(provenance, device), stored_precision(provenance), device)


def _stored_model(provenance: dict, device: str):
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
