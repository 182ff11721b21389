"""The CSMoE encoder (CSMAE with Soft MoE layers); its configs live in `rsretrieve.models.registry`.

Structure (see docs/MODELS.md):

    x (B, C, H, W) --patch_embed[_s2]--> tokens + [CLS] + pos_embed
        --blocks_s1 | blocks_s2 (modality-specific, pre-norm)--> norm_s1 | norm_s2
        --blocks (shared cross-sensor)--> norm --> (B, 1+N, D);  embed = raw [CLS]

Module names follow CSMAE's (timm ViT) so that a CSMAE Lightning checkpoint maps onto this model by
stripping the `backbone.` prefix: `patch_embed.proj` (S1), `patch_embed_s2.proj`, `cls_token` (S1),
`cls_token_s2`, `pos_embed` (shared), `blocks_s1.i`, `blocks_s2.i`, `blocks.i` (cross-sensor),
`norm_s1`, `norm_s2`, `norm`; inside a block `norm1`, `attn.qkv`, `attn.proj`, `norm2` and either
`mlp.fc1`, `mlp.fc2` (dense) or `mlp.phi`, `mlp.scale`, `mlp.fc{1,2}_{weight,bias}` (Soft MoE).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsretrieve.models.preprocessing import resize_batch
from rsretrieve.models.registry import CSMoEConfig, get_config
from rsretrieve.models.softmoe import RoutingWeights, SoftMoE, expert_usage
from rsretrieve.provenance import RANDOM_INIT

__all__ = ["CSMoE", "create_model", "encode", "to_inference_dtype"]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D). Same result as the Conv2d (kernel = stride = patch), computed as
        patchify + one GEMM: oneDNN's convolution with 14-32 px kernels runs at a fraction of the
        matmul rate on CPU (1.7 s vs ~0.3 s for csmoe-p32 at batch 32)."""
        if x.device.type != "cpu":
            return self.proj(x).flatten(2).transpose(1, 2)
        b, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        gh, gw = h // p, w // p
        patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # fused (flash) kernel where available
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is a dense Mlp or a SoftMoE."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float,
                 moe: tuple[int, int] | None = None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SoftMoE(dim, moe[0], moe[1], hidden) if moe else Mlp(dim, hidden)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, SoftMoE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position embedding with a zero row for [CLS]: (1, 1+grid², dim). As in
    MAE's and CSMAE's `get_2d_sincos_pos_embed`, the first half of the channels encodes the token's
    column and the second half its row (tokens in row-major order)."""
    if dim % 4:
        return torch.zeros(1, 1 + grid * grid, dim)
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    pe = torch.cat([emb(gx), emb(gy)], dim=1).float()
    return torch.cat([torch.zeros(1, dim), pe], dim=0)[None]


class CSMoE(nn.Module):
    """CSMoE / CSMAE encoder. Use `create_model(name, seed)` or `rsretrieve.load_model`."""

    def __init__(self, config: CSMoEConfig):
        super().__init__()
        c = config
        self.config = c
        d = c.embed_dim
        moe = (c.num_experts, c.slots_per_expert)

        def blocks(depth, moe_idx):
            return nn.ModuleList(
                Block(d, c.num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps, moe if i in moe_idx else None)
                for i in range(depth)
            )

        self.patch_embed = PatchEmbed(c.s1_chans, d, c.patch_size)
        self.patch_embed_s2 = PatchEmbed(c.s2_chans, d, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cls_token_s2 = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, d), requires_grad=False)
        self.blocks_s1 = blocks(c.depth_modality, c.moe_layers_modality)
        self.blocks_s2 = blocks(c.depth_modality, c.moe_layers_modality)
        self.blocks = blocks(c.depth_cross, c.moe_layers_cross)
        self.norm_s1 = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm_s2 = nn.LayerNorm(d, eps=c.norm_eps)
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        # timm names: with global_pool="avg" the pooled patch tokens go through `fc_norm`
        self.fc_norm = nn.LayerNorm(d, eps=c.norm_eps) if c.global_pool == "avg" else None
        self._checkpoint_sha256: str = RANDOM_INIT
        self._checkpoint_path: str | None = None
        self.source: dict[str, Any] = {}  # how a checkpoint was imported (format, recognised variant)
        self.init_weights()

    # -- init / provenance ------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic given the global torch RNG state (`create_model` seeds it)."""
        if self.pos_embed.device.type != "meta":
            self.pos_embed.copy_(_sincos_pos_embed(self.config.embed_dim, self.config.grid_size))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.cls_token_s2, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, SoftMoE):
                m.reset_parameters()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "model": self.config.name,
            "config": self.config.to_dict(),
            "checkpoint_sha256": self._checkpoint_sha256,
            "checkpoint_path": self._checkpoint_path,
            "preprocessing": self.config.preprocessing.to_dict(),
            **({"source": dict(self.source)} if self.source else {}),
        }

    @property
    def is_random_init(self) -> bool:
        return self._checkpoint_sha256 == RANDOM_INIT

    def set_provenance(self, sha256: str, path: str | None) -> None:
        self._checkpoint_sha256, self._checkpoint_path = sha256, path

    # -- forward ------------------------------------------------------------------------------

    def _modality_parts(self, modality: str):
        if modality == "s1":
            return self.patch_embed, self.cls_token, self.blocks_s1, self.norm_s1
        if modality == "s2":
            return self.patch_embed_s2, self.cls_token_s2, self.blocks_s2, self.norm_s2
        raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")

    def forward_features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """(B, C, img, img) normalised pixels of one modality -> tokens (B, 1+N, D)."""
        patch_embed, cls_token, blocks, norm = self._modality_parts(modality)
        want = self.config.chans(modality)
        if x.ndim != 4 or x.shape[1] != want:
            raise ValueError(f"{modality} input must be (B, {want}, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.config.img_size, self.config.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])} px; {self.config.name} expects {self.config.img_size} (use embed())")
        t = patch_embed(x)
        t = torch.cat([cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1) + self.pos_embed.to(t.dtype)
        for blk in blocks:
            t = blk(t)
        t = norm(t)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.forward_features(x, modality)

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """The retrieval vector (B, D) of normalised pixels: the raw (un-normalised) [CLS] of the
        cross-sensor output, or with global_pool="avg" `fc_norm(mean of the patch tokens)`.
        Resizes to img_size (the preprocessing's method) if the caller did not."""
        if x.ndim == 4 and x.shape[-2:] != (self.config.img_size, self.config.img_size):
            x = resize_batch(x, self.config.img_size, self.config.preprocessing.resize)
        tokens = self.forward_features(x, modality)
        if self.fc_norm is not None:
            return self.fc_norm(tokens[:, 1:].mean(dim=1))
        return tokens[:, 0]

    # -- routing introspection ----------------------------------------------------------------

    def moe_layers(self) -> dict[str, SoftMoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SoftMoE)}

    @torch.no_grad()
    def routing_weights(self, x: torch.Tensor, modality: str) -> dict[str, RoutingWeights]:
        """Run a forward pass and return each used Soft MoE layer's (dispatch, combine) weights."""
        layers = self.moe_layers()
        for m in layers.values():
            m.record_weights, m.last_weights = True, None
        try:
            self.embed(x, modality)
            return {n: m.last_weights for n, m in layers.items() if m.last_weights is not None}
        finally:
            for m in layers.values():
                m.record_weights, m.last_weights = False, None

    def expert_usage(self, x: torch.Tensor, modality: str) -> dict[str, torch.Tensor]:
        """Per MoE layer, the (E,) share of combine weight each expert receives on this input."""
        return {n: expert_usage(w.combine) for n, w in self.routing_weights(x, modality).items()}


# ---------------------------------------------------------------------------------------------
# Construction and inference helpers
# ---------------------------------------------------------------------------------------------


def create_model(name_or_config: str | CSMoEConfig, seed: int = 0, device: str | torch.device | None = None) -> CSMoE:
    """A randomly initialised model (provenance 'random-init'); deterministic for a given seed.
    `device="meta"` builds it without allocating (for counting)."""
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                model = CSMoE(config)
        else:
            model = CSMoE(config)
            if device is not None:
                model = model.to(device)
    return model.eval()


def encode(model: CSMoE, x: torch.Tensor, modality: str, device: str | torch.device | None = None) -> torch.Tensor:
    """Inference helper: (B, C, H, W) -> (B, D) float32 retrieval vectors, in inference mode. A
    model whose weights are bf16 (`to_inference_dtype`) runs in bf16; float32 weights run with
    bf16 autocast on CUDA and in float32 on the CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    weights = next(model.parameters()).dtype
    with torch.inference_mode():
        x = x.to(device, dtype=weights, non_blocking=True)
        if device.type == "cuda" and weights == torch.float32:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model.embed(x, modality)
        else:
            out = model.embed(x, modality)
        return out.float()


def to_inference_dtype(model: CSMoE, precision: str, device: str | torch.device) -> CSMoE:
    """Cast the weights for inference: float32, bfloat16 or float16 (bf16/fp32/fp16 accepted), or
    "auto" (bfloat16 on CUDA, where it is 1.2x faster than autocast; the CPU stays float32). The
    fixed position embedding stays exact enough in bf16 for retrieval (cosine >= 0.98 to fp32 on
    real patches, tests/test_model.py)."""
    if precision == "auto":
        precision = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision must be auto, float32, bfloat16 or float16, got {precision!r}")
    return model.to(dtypes[precision])
