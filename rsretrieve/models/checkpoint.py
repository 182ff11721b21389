"""Model checkpoints: rsretrieve's own safetensors format, plain state dicts, CSMAE's, load_model.

- Own format: one `<name>.safetensors` file (or a directory holding exactly one) with every tensor
  of the model's state_dict; its safetensors metadata holds `{"format": "rsretrieve-csmoe/1",
  "config": <config JSON>}` (the config includes the model's preprocessing).
- Plain weights: a `.safetensors` state dict without that metadata (the way timm and Hugging Face
  publish weights) loads into a registered config named with `config=` (`--model NAME`).
- CSMAE Lightning checkpoints (`.ckpt`, `.pt`, `.pth`) are read with
  `torch.load(weights_only=True)` (never unpickling arbitrary objects) and imported by
  `rsretrieve.models.csmae` (docs/MODELS.md).

The sha256 of the file is recorded in `model.provenance["checkpoint_sha256"]`. Every load is
strict: a missing, unexpected or wrongly shaped tensor raises `CheckpointError` naming the first
offending keys, before anything is copied into the model, and before the model is even built: the
config's shapes come from a skeleton on the `meta` device (no memory), the file's from the
safetensors header (no tensor read). A config that lies (embed_dim 65536 over a tiny model's
weights) allocated its 51 GB model before the shapes were compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from rsretrieve.models.csmoe import CSMoE, create_model
from rsretrieve.models.registry import REGISTRY, CSMoEConfig, get_config
from rsretrieve.errors import CheckpointError, located

__all__ = [
    "FORMAT",
    "save_model",
    "load_model",
    "load_own",
    "load_csmae_lightning",
    "check_state_dict",
    "check_shapes_first",
    "sha256_file",
]

log = logging.getLogger(__name__)
FORMAT = "rsretrieve-csmoe/1"
LIGHTNING_SUFFIXES = (".ckpt", ".pt", ".pth")
_MAX_LISTED = 5


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# strict state_dict checking
# ---------------------------------------------------------------------------------------------


def _fmt(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _model_order(model: torch.nn.Module):
    """Sort key placing foreign keys where their nearest module sits in the model (so that 'first'
    means first in the forward order, not alphabetical)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def key(k: str):
        parts = k.split(".")
        for j in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:j])
            if prefix in order:
                return (order[prefix], k)
        return (len(order), k)

    return key


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: object) -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys with the same shapes."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = sorted((k for k in state if k not in expected), key=_model_order(model))
    shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if shape:
        problems.append(f"shape mismatch: {_fmt(shape)}")
    if problems:
        raise CheckpointError(located(path, f"checkpoint does not match config {model.config.name!r}: " + "; ".join(problems)))


def check_shapes_first(config: CSMoEConfig, shapes: Mapping[str, tuple[int, ...]], path: object) -> None:
    """`check_state_dict` against the config's skeleton on the meta device (nothing allocated, no
    weights initialised), given only the checkpoint's tensor shapes: a config that does not fit
    its tensors is refused before its model is built."""
    try:
        skeleton = create_model(config, device="meta")
    except Exception as exc:  # noqa: BLE001 - a config no model can be built from
        raise CheckpointError(located(path, f"config {config.name!r} cannot build a model ({_one_line(exc)})")) from None
    check_state_dict(skeleton, {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items()}, path)


def _load_into(model: CSMoE, state: Mapping[str, torch.Tensor], path: object) -> None:
    check_state_dict(model, state, path)
    for k, v in state.items():
        if not v.is_floating_point():
            raise CheckpointError(located(path, f"tensor {k} has non-float dtype {v.dtype}"))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------------------------------------
# own format
# ---------------------------------------------------------------------------------------------


def save_model(model: CSMoE, path: str | os.PathLike) -> Path:
    """Write `model` to `path` (a `.safetensors` file, or a directory that gets `<name>.safetensors`).
    Returns the file written. Weights are stored float32, contiguous."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / f"{model.config.name}.safetensors"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": model.config.to_json()}
    if model.source:  # where converted weights came from (e.g. a recognised CSMAE variant)
        meta["source"] = json.dumps(model.source, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def _resolve_own(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(located(path, f"expected exactly one .safetensors file in the directory, found {len(files)}"))
        return files[0]
    return path


def load_own(path: str | os.PathLike, device: str = "cpu", config: CSMoEConfig | str | None = None) -> CSMoE:
    """Load an rsretrieve safetensors checkpoint, or a plain safetensors state dict into `config`.
    `config` (optional for our own files) overrides the stored config: the weights must match it."""
    from safetensors import safe_open

    path = _resolve_own(Path(path))
    if not path.is_file():
        raise CheckpointError(located(path, "no such checkpoint file"))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # the header: no tensor read
    except Exception as exc:  # truncated / corrupt header
        raise CheckpointError(located(path, f"unreadable safetensors file ({type(exc).__name__}: {_one_line(exc)})")) from None
    source = {"format": "rsretrieve" if meta.get("format") == FORMAT else "state-dict"}
    if meta.get("source"):
        source["converted_from"] = json.loads(meta["source"])
    if config is None:
        if meta.get("format") != FORMAT or "config" not in meta:
            raise CheckpointError(located(path, "a plain state dict without rsretrieve metadata: name the config its "
                                                f"weights fit with --model NAME (registered: {', '.join(sorted(REGISTRY))})"))
        try:
            config = CSMoEConfig.from_dict(json.loads(meta["config"]))
        except Exception as exc:
            raise CheckpointError(located(path, f"invalid config in metadata: {_one_line(exc)}")) from None
    check_shapes_first(get_config(config) if isinstance(config, str) else config, shapes, path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated / corrupt data
        raise CheckpointError(located(path, f"unreadable safetensors file ({type(exc).__name__}: {_one_line(exc)})")) from None
    return _model_from_state(config, state, path, device, source)


def _model_from_state(config: CSMoEConfig | str, state: Mapping[str, torch.Tensor], path: Path, device: str,
                      source: dict | None = None) -> CSMoE:
    """Build the config's model (its shapes checked against the state's first), load the state
    strictly and stamp the file's sha256 as provenance."""
    config = get_config(config) if isinstance(config, str) else config
    check_shapes_first(config, {k: tuple(v.shape) for k, v in state.items()}, path)
    model = create_model(config)
    _load_into(model, state, path)
    model.set_provenance(sha256_file(path), str(path))
    model.source = dict(source or {})
    return model.to(device).eval()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _torch_load(path: Path) -> Any:
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(located(path, f"refused: the file holds pickled objects that are not plain tensors/containers (weights_only load): {_one_line(exc)}")) from None
    except Exception as exc:
        raise CheckpointError(located(path, f"unreadable checkpoint ({type(exc).__name__}: {_one_line(exc)})")) from None


def load_csmae_lightning(path: str | os.PathLike, device: str = "cpu", config: CSMoEConfig | str | None = None) -> CSMoE:
    """Import a CSMAE Lightning checkpoint (dict with `state_dict`, or a bare state_dict; without
    `backbone.` keys, plain weights of the named `config`)."""
    from rsretrieve.models.csmae import load_csmae

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(located(path, "no such checkpoint file"))
    config = get_config(config) if isinstance(config, str) else config
    obj = _torch_load(path)
    state = obj["state_dict"] if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) else obj
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(located(path, "not a state_dict (expected a mapping of names to tensors)"))
    if config is not None and not any(str(k).startswith("backbone.") for k in state):
        return _model_from_state(config, state, path, device, {"format": "state-dict"})  # plain weights, named config
    config, backbone, source = load_csmae(state, path, config)
    return _model_from_state(config, backbone, path, device, source)


CONVERT_HINT = ("save its state dict as safetensors in Python (`safetensors.torch.save_file(state_dict, "
                "'weights.safetensors')`), then pass `--checkpoint weights.safetensors --model NAME`, or make it "
                "self-describing with `rsretrieve convert weights.safetensors model.safetensors --model NAME`")


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def load_model(name_or_path: str | os.PathLike, device: str = "cpu", config: CSMoEConfig | str | None = None) -> CSMoE:
    """A registered config name (random weights, loudly flagged), an rsretrieve `.safetensors`
    checkpoint (file or directory) or a CSMAE Lightning checkpoint (`.ckpt`/`.pt`/`.pth`)."""
    s = str(name_or_path)
    if s in REGISTRY and not Path(s).exists():
        msg = (f"model {s!r} has RANDOM weights (no checkpoint given): embeddings are meaningless for "
               "retrieval; pass a checkpoint path for real results")
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
        return create_model(s, device=device)
    path = Path(s)
    if not path.exists():
        raise CheckpointError(located(path, f"no such checkpoint, and not a registered model name (known: {', '.join(sorted(REGISTRY))})"))
    if path.is_dir() or path.suffix == ".safetensors":
        return load_own(path, device=device, config=config)
    if path.suffix in LIGHTNING_SUFFIXES:
        return load_csmae_lightning(path, device=device, config=config)
    raise CheckpointError(located(path, f"unknown checkpoint type {path.suffix!r} (rsretrieve reads .safetensors, a directory "
                                        f"holding one, or CSMAE's .ckpt/.pt/.pth); {CONVERT_HINT}"))
