"""Importer for CSMAE's published checkpoints (jakhac/CSMAE; the CSMoE paper's baseline).

CSMAE publishes four ViT-B/15 models as `checkpoints/<variant>/weights.ckpt` (a Lightning
checkpoint, `state_dict` with the backbone under `backbone.` and the pretraining decoders beside
it) and `cfg.yaml` (the backbone's `kwargs`). Their backbone (`src/csmae_backbone.py`, a timm 0.9.2
`VisionTransformer`) has the module names of `rsretrieve.models.csmoe`, so the weights load by
stripping `backbone.`. What the shapes cannot tell comes from the code CSMAE trained with:

- `vit_base` (all four variants): 12 heads, LayerNorm eps 1e-6; the other sizes of its factory
  (`vit_tiny` 192/3, `vit_small` 384/6, `vit_large` 1024/16) likewise; any other width needs
  `num_heads` in `cfg.yaml` (or a registered config, `--model`).
- `global_pool: avg` (all four): timm builds `fc_norm`; the retrieval vector is
  `fc_norm(mean of the patch tokens)` (CSMAE also keeps `norm` after its shared blocks).
- Preprocessing `csmae-ben1` (`rsretrieve.recipes`): CSMAE's band order, BigEarthNet v1
  statistics, bicubic upsampling with align_corners=True, the H/W transpose.

The variant is recognised from the encoder depths (SE: 10 sensor-specific + 2 shared layers, CE:
12 + 0) and the decoder keys (`decoder.*`: common decoder, CD; `decoder_s1_to_s2.*` and
`decoder_s2_to_s1.*`: specific decoders, SD) and recorded in the model's provenance (`source`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rsretrieve.errors import CheckpointError, located
from rsretrieve.models.registry import REGISTRY, CSMoEConfig
from rsretrieve.recipes import CSMAE_BEN1

__all__ = ["VIT_HEADS", "csmae_variant", "infer_csmae_config", "load_csmae", "read_csmae_cfg", "strip_backbone"]

# CSMAE's backbone factory (`vit_tiny` ... `vit_large`): width -> heads; all use LayerNorm eps 1e-6
VIT_HEADS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12), "vit_large": (1024, 16)}
CFG_FILES = ("cfg.yaml", "args.yaml")  # the published layout; the training run's own config
DECODERS = {"decoder": "common", "decoder_s1_to_s2": "specific", "decoder_s2_to_s1": "specific"}
_BLOCK = re.compile(r"^(blocks_s1|blocks_s2|blocks)\.(\d+)\.")


def strip_backbone(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str | None]:
    """(`backbone.<name>` -> `<name>`, the decoding strategy the other keys show: "common",
    "specific" or None). Decoders and other pretraining keys are dropped."""
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    strategies = {DECODERS[k.split(".")[0]] for k in state if k.split(".")[0] in DECODERS}
    return backbone, (strategies.pop() if len(strategies) == 1 else None)


def read_csmae_cfg(checkpoint: Path) -> tuple[dict[str, Any], Path | None]:
    """The backbone section (`{"name": ..., "kwargs": {...}}`) of the CSMAE config file beside a
    checkpoint (`cfg.yaml` as published, or a run's `args.yaml`), or ({}, None) when there is none."""
    import yaml

    for name in CFG_FILES:
        path = checkpoint.parent / name
        if path.is_file():
            try:
                cfg = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise CheckpointError(located(path, f"unreadable YAML ({' '.join(str(exc).split())[:200]})")) from None
            if not isinstance(cfg, Mapping):
                raise CheckpointError(located(path, "not a CSMAE config (expected a mapping)"))
            section = cfg.get("backbone", cfg)
            return {"name": section.get("name"), "kwargs": dict(section.get("kwargs") or {})}, path
    return {}, None


def _depths(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depths: dict[str, int] = {}
    for k in state:
        m = _BLOCK.match(k)
        if m:
            depths[m.group(1)] = max(depths.get(m.group(1), 0), int(m.group(2)) + 1)
    return depths


def _heads(dim: int, cfg: Mapping[str, Any], shape_sig: dict, path: object) -> int:
    kwargs = cfg.get("kwargs") or {}
    if isinstance(kwargs.get("num_heads"), int):
        return kwargs["num_heads"]
    if cfg.get("name") in VIT_HEADS:
        return VIT_HEADS[cfg["name"]][1]
    by_width = {width: heads for width, heads in VIT_HEADS.values()}
    if dim in by_width:
        return by_width[dim]
    for registered in REGISTRY.values():
        if not registered.is_moe and all(getattr(registered, k) == v for k, v in shape_sig.items()):
            return registered.num_heads
    raise CheckpointError(located(path, f"cannot tell the attention heads of a {dim}-wide CSMAE backbone (not one of "
                                        f"CSMAE's vit_tiny/small/base/large); put its cfg.yaml (kwargs.num_heads) beside "
                                        "the checkpoint, or pass --model NAME of a registered config"))


def infer_csmae_config(state: Mapping[str, torch.Tensor], path: object, cfg: Mapping[str, Any] | None = None) -> CSMoEConfig:
    """The dense config of a CSMAE backbone from its tensor shapes and its cfg (see the module
    docstring). The name is a registered config's when one has these shapes."""
    cfg = cfg or {}
    try:
        w_s1, w_s2, pos = state["patch_embed.proj.weight"], state["patch_embed_s2.proj.weight"], state["pos_embed"]
    except KeyError as exc:
        raise CheckpointError(located(path, f"not a CSMAE backbone: missing key backbone.{exc.args[0]}")) from None
    dim, s1_chans, patch, _ = w_s1.shape
    n = pos.shape[-2] - 1
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise CheckpointError(located(path, f"pos_embed has {n} patch positions, not a square grid"))
    depths = _depths(state)
    if depths.get("blocks_s1", 0) != depths.get("blocks_s2", 0):
        raise CheckpointError(located(path, f"S1 and S2 encoders differ in depth: {depths}"))
    fc1 = state.get("blocks_s1.0.mlp.fc1.weight", state.get("blocks.0.mlp.fc1.weight"))
    shape_sig = dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth_modality=depths.get("blocks_s1", 0),
                     depth_cross=depths.get("blocks", 0), s1_chans=s1_chans, s2_chans=w_s2.shape[1],
                     mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 4.0)
    heads = _heads(dim, cfg, shape_sig, path)
    pool = "avg" if "fc_norm.weight" in state else "token"
    config = CSMoEConfig(name=f"csmae-imported-p{patch}", num_heads=heads, num_experts=1, moe_layers_modality=(),
                         moe_layers_cross=(), global_pool=pool, preprocessing=CSMAE_BEN1, **shape_sig)
    for registered in REGISTRY.values():
        if registered.to_dict() == config.replace(name=registered.name).to_dict():
            return registered
    return config


def csmae_variant(config: CSMoEConfig, decoding: str | None) -> str | None:
    """`csmae_sesd`, `csmae_secd`, `csmae_cesd` or `csmae_cecd` for CSMAE's published ViT-B/15
    models (decoding None: `csmae_se??`), else None."""
    if (config.embed_dim, config.patch_size, config.img_size, config.global_pool) != (768, 15, 120, "avg"):
        return None
    encoder = {(10, 2): "se", (12, 0): "ce"}.get((config.depth_modality, config.depth_cross))
    if encoder is None:
        return None
    decoder = {"specific": "sd", "common": "cd"}.get(decoding or "", "??")
    return f"csmae_{encoder}{decoder}"


def load_csmae(full_state: Mapping[str, torch.Tensor], path: Path, config: CSMoEConfig | None = None):
    """(config, backbone state, provenance `source`) of a CSMAE checkpoint's state dict (its
    Lightning `state_dict`: the backbone under `backbone.`, the decoders beside it)."""
    state, decoding = strip_backbone(full_state)
    if not state:
        raise CheckpointError(located(path, "no keys under 'backbone.': not a CSMAE checkpoint (a plain state dict "
                                            "loads with --model NAME naming the config its weights fit)"))
    cfg, cfg_path = read_csmae_cfg(path)
    config = config or infer_csmae_config(state, path, cfg)
    source = {"format": "csmae-lightning", "variant": csmae_variant(config, decoding),
              "decoder": decoding or "unknown", "cfg": str(cfg_path) if cfg_path else None,
              "vector": "fc_norm(mean of patch tokens)" if config.global_pool == "avg" else "[CLS]"}
    return config, state, source
