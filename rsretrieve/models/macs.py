"""Parameter and MAC counting, and the comparison with the CSMoE paper's Table IV.

Two conventions, both with one multiply-accumulate = 1:

- ``fvcore``: we count with `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per MAC for
  matmul/conv/attention) and halve, plus fvcore's layer-norm count (5 per element with an affine
  transform) via a custom mapping. Biases, GELU, softmax, additions, F.normalize: not counted.
- ``paper``: the same without the attention matrix products (q·kᵀ and attn·v, 2·N²·d per layer),
  which is how the CSMoE paper's Table I figures come out exactly (fvcore's default handles skip
  the `matmul`s inside attention): Prithvi V2-300 59.85 G, V2-600 162.18 G, CSMAE's 10-band S2
  path 5.638 G (`reference_vit` reproduces them; tests/test_model.py).

The models are built on the meta device and run with a batch of 1, so counting is instant.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rsretrieve.models.csmoe import CSMoE, create_model
from rsretrieve.models.registry import CSMoEConfig, get_config

__all__ = ["CONVENTIONS", "TABLE_IV", "count_params", "count_macs", "model_macs", "model_report", "reference_vit", "reference_vit_b"]

CONVENTIONS = ("fvcore", "paper")

# variant -> (params, MACs per image) as printed in the paper's Table IV
TABLE_IV: dict[str, tuple[float, float]] = {
    "csmoe-p32": (277e6, 2.92e9),
    "csmoe-p28": (275e6, 3.67e9),
    "csmoe-p16": (271e6, 10.11e9),
    "csmoe-p14": (271e6, 13.40e9),
    "csmae-p15": (87e6, 5.64e9),
}


def _layer_norm_flops(input_shape, normalized_shape, weight_shape=None, bias_shape=None, *args, out_shape=None, **kwargs) -> int:
    # fvcore: 5 ops per element with affine (mean, var, normalise, scale, shift), counted as "flops"
    # that are already MACs. FlopCounterMode halves nothing itself; we return 2x so that the /2 in
    # count_macs leaves fvcore's figure.
    numel = 1
    for s in input_shape:
        numel *= s
    per = 5 if weight_shape is not None else 4
    return 2 * per * numel


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA fused attention kernels but not the CPU flash kernel; same
    # count as theirs: q @ k^T and attn @ v, 2 FLOPs per MAC.
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CUSTOM = {torch.ops.aten.native_layer_norm: _layer_norm_flops}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *args, convention: str = "fvcore", **kwargs) -> int:
    """MACs of one call `module(*args, **kwargs)` in a convention (module docstring)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    from rsretrieve.models.csmoe import Attention

    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    attention = [0]

    def matrix_products(_module, inputs, _output):  # q·kᵀ and attn·v: 2·N²·d MACs per image
        b, n, d = inputs[0].shape
        attention[0] += 2 * b * n * n * d

    owner = getattr(module, "__self__", module)  # a bound method (model.forward_features) counts too
    hooks = [m.register_forward_hook(matrix_products) for m in owner.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad(), counter:
            module(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    total = counter.get_total_flops() // 2
    return total - attention[0] if convention == "paper" else total


def count_macs_breakdown(module: nn.Module, *args, **kwargs) -> dict[str, int]:
    """MACs per aten op, for documentation and debugging."""
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return {str(op): n // 2 for op, n in counter.get_flop_counts()["Global"].items()}


def _meta_model(config: CSMoEConfig) -> CSMoE:
    return create_model(config, device="meta")


def model_macs(name_or_config: str | CSMoEConfig, modality: str = "s2", convention: str = "fvcore") -> int:
    """MACs per image of one modality path (patch embed, modality encoder, cross-sensor encoder, and
    the pooling head: `fc_norm` for global_pool="avg")."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    model = _meta_model(config)
    x = torch.empty(1, config.chans(modality), config.img_size, config.img_size, device="meta")
    return count_macs(model.embed, x, modality, convention=convention)


def path_params(model: CSMoE, modality: str = "s2") -> int:
    """Parameters one modality path uses (its patch embed, CLS, encoder and norm + shared parts)."""
    def other(name: str) -> bool:
        if modality == "s2":
            return name == "cls_token" or name.startswith(("patch_embed.", "blocks_s1.", "norm_s1."))
        return name == "cls_token_s2" or name.startswith(("patch_embed_s2.", "blocks_s2.", "norm_s2."))

    return sum(p.numel() for n, p in model.named_parameters() if not other(n))


class _ReferenceViT(nn.Module):
    """A plain timm-style ViT (patch embedding, [CLS], pre-norm blocks, final norm, optional
    classifier head) for checking the MAC conventions against the paper's Table I."""

    def __init__(self, img_size=120, patch_size=15, depth=12, dim=768, heads=12, in_chans=3, classes=1000):
        super().__init__()
        from rsretrieve.models.csmoe import Block, PatchEmbed

        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, True, 1e-6) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes) if classes else nn.Identity()

    def forward(self, x):
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed
        for b in self.blocks:
            t = b(t)
        return self.head(self.norm(t)[:, 0])


def reference_vit(**kwargs) -> tuple[nn.Module, torch.Tensor]:
    """(meta-device reference ViT, meta input (1, C, img, img)); kwargs as `_ReferenceViT`."""
    with torch.device("meta"):
        m = _ReferenceViT(**kwargs)
    img = kwargs.get("img_size", 120)
    return m, torch.empty(1, kwargs.get("in_chans", 3), img, img, device="meta")


reference_vit_b = reference_vit  # the ViT-B defaults of `_ReferenceViT`


@lru_cache(maxsize=None)
def _report_row(name: str) -> dict[str, Any]:
    config = get_config(name)
    model = _meta_model(config)
    params = count_params(model)
    p_s2 = path_params(model, "s2")
    macs_s2 = model_macs(config, "s2")
    macs_s1 = model_macs(config, "s1")
    paper_s2 = model_macs(config, "s2", convention="paper")
    paper_params, paper_macs = TABLE_IV.get(name, (None, None))
    # CSMoE's Table IV params count both modality encoders; CSMAE's 87M is one ViT-B path.
    params_basis = "s2-path" if not config.is_moe else "all"
    compared_params = p_s2 if params_basis == "s2-path" else params
    deviations = None
    if paper_params is not None:
        deviations = {"params": compared_params / paper_params - 1, "macs": macs_s2 / paper_macs - 1,
                      "macs_paper_convention": paper_s2 / paper_macs - 1}
    return {
        "name": name,
        "params": params,
        "params_s2_path": p_s2,
        "params_basis": params_basis,
        "macs": macs_s2,
        "macs_s2": macs_s2,
        "macs_s1": macs_s1,
        "macs_s2_paper_convention": paper_s2,
        "slots_per_expert": config.slots_per_expert if config.is_moe else None,
        "paper_params": paper_params,
        "paper_macs": paper_macs,
        "deviations": deviations,
        "c2c": (compared_params / 1e6) / (macs_s2 / 1e9),
        "paper_c2c": (paper_params / 1e6) / (paper_macs / 1e9) if paper_params else None,
    }


def model_report(names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per Table IV variant (or per given name): params, MACs per S2 image (`macs`; the S1
    path is `macs_s1`), the paper's figures, relative deviations and the C2C ratio (params in M /
    MACs in G). Counting happens on the meta device (well under a second per model)."""
    return [dict(_report_row(n)) for n in (names or list(TABLE_IV))]
