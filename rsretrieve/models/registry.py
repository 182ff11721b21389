"""Named model configs: the frozen `CSMoEConfig` and a timm-style registry of them.

    get_config("csmoe-p16")            # a registered config
    register_config(CSMoEConfig(...))  # add one (e.g. for a checkpoint of another size)

Other packages add configs through the `rsretrieve.models` entry-point group
(`rsretrieve.io.entry_points`); rsretrieve's own (`BUILTIN`) are registered the same way. Configs are frozen and JSON round-trip, so they serialise into checkpoints and store provenance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from rsretrieve.bands import S1_BANDS, S2_BANDS
from rsretrieve.io.entry_points import EntryPointRegistry
from rsretrieve.recipes import BENV2_NEAREST, CSMAE_BEN1, Preprocessing

POOLS = ("token", "avg")


@dataclass(frozen=True)
class CSMoEConfig:
    """Frozen, JSON-serialisable model config. `moe_layers_*` index the layers (0-based) of the
    modality-specific and cross-sensor encoders that use Soft MoE instead of a dense MLP.

    `global_pool` picks the retrieval vector: "token" = the raw [CLS] after the last norm (CSMoE,
    Table V), "avg" = `fc_norm` of the mean of the patch tokens (CSMAE: timm's global_pool='avg').
    `preprocessing` is what the model does to raw band values (`rsretrieve.recipes`)."""

    name: str
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    num_heads: int = 12
    depth_modality: int = 4
    depth_cross: int = 2
    mlp_ratio: float = 4.0
    num_experts: int = 8
    moe_layers_modality: tuple[int, ...] = (1, 3)
    moe_layers_cross: tuple[int, ...] = (0, 1)
    capacity_factor: float = 1.25
    slots_per_expert_override: int | None = None
    s1_chans: int = len(S1_BANDS)
    s2_chans: int = len(S2_BANDS)
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    global_pool: str = "token"
    preprocessing: Preprocessing = BENV2_NEAREST
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if not isinstance(self.preprocessing, Preprocessing):
            object.__setattr__(self, "preprocessing", Preprocessing.from_dict(self.preprocessing))
        if self.global_pool not in POOLS:
            raise ValueError(f"{self.name}: global_pool must be one of {POOLS}, got {self.global_pool!r}")
        for modality in ("s1", "s2"):
            if len(self.preprocessing.bands(modality)) != self.chans(modality):
                raise ValueError(f"{self.name}: {self.chans(modality)} {modality} channels but preprocessing "
                                 f"{self.preprocessing.name!r} orders {len(self.preprocessing.bands(modality))} bands")
        object.__setattr__(self, "moe_layers_modality", tuple(int(i) for i in self.moe_layers_modality))
        object.__setattr__(self, "moe_layers_cross", tuple(int(i) for i in self.moe_layers_cross))
        if self.img_size % self.patch_size:
            raise ValueError(f"{self.name}: img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.name}: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        for i in self.moe_layers_modality:
            if not 0 <= i < self.depth_modality:
                raise ValueError(f"{self.name}: MoE layer {i} outside the modality encoder")
        for i in self.moe_layers_cross:
            if not 0 <= i < self.depth_cross:
                raise ValueError(f"{self.name}: MoE layer {i} outside the cross-sensor encoder")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers_modality or self.moe_layers_cross)

    @property
    def slots_per_expert(self) -> int:
        """vmoe's rule: round(capacity_factor * tokens / experts), at least 1 (tokens include [CLS])."""
        if self.slots_per_expert_override is not None:
            return int(self.slots_per_expert_override)
        return max(1, int(math.floor(self.capacity_factor * self.num_tokens / self.num_experts + 0.5)))

    def chans(self, modality: str) -> int:
        if modality == "s1":
            return self.s1_chans
        if modality == "s2":
            return self.s2_chans
        raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["moe_layers_modality"] = list(self.moe_layers_modality)
        d["moe_layers_cross"] = list(self.moe_layers_cross)
        d["preprocessing"] = self.preprocessing.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CSMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "CSMoEConfig":
        return dataclasses.replace(self, **changes)


def _add_configs(registry: dict, name: str, found) -> None:
    """An entry of the `rsretrieve.models` group: one config, or an iterable of them."""
    for config in [found] if isinstance(found, CSMoEConfig) else list(found):
        if not isinstance(config, CSMoEConfig):
            raise TypeError(f"{name}: expected CSMoEConfig objects, got {type(config).__name__}")
        registry[config.name] = config


# the registered configs: rsretrieve's own (`BUILTIN`, below) and those installed packages declare
# in the `rsretrieve.models` entry-point group (`rsretrieve.io.entry_points`), loaded on first use
REGISTRY = EntryPointRegistry("rsretrieve.models", _add_configs, lambda: [("builtin", BUILTIN)])


def register_config(config: CSMoEConfig) -> CSMoEConfig:
    """Add a config at run time (e.g. for a checkpoint of another size)."""
    REGISTRY.load()[config.name] = config
    return config


BUILTIN: list[CSMoEConfig] = [CSMoEConfig(name=f"csmoe-p{_p}", patch_size=_p) for _p in (14, 16, 28, 32)]
# CSMAE's published ViT-B/15 backbones (jakhac/CSMAE): "SE" = 10 sensor-specific + 2 shared layers
# (csmae_secd, csmae_sesd), "CE" = 12 + 0 (csmae_cecd, csmae_cesd). Retrieval vector fc_norm(mean of
# the patch tokens); CSMAE's own preprocessing.
_CSMAE = dict(img_size=120, patch_size=15, moe_layers_modality=(), moe_layers_cross=(), num_experts=1,
              global_pool="avg", preprocessing=CSMAE_BEN1)
BUILTIN += [
    CSMoEConfig(name="csmae-p15", depth_modality=10, depth_cross=2, **_CSMAE),
    CSMoEConfig(name="csmae-ce-p15", depth_modality=12, depth_cross=0, **_CSMAE),
    CSMoEConfig(name="csmoe-tiny", img_size=64, patch_size=16, embed_dim=64, num_heads=2, depth_modality=2,
                depth_cross=1, num_experts=4, moe_layers_modality=(1,), moe_layers_cross=(0,)),
    CSMoEConfig(name="csmae-tiny", img_size=64, patch_size=16, embed_dim=64, num_heads=2, depth_modality=2,
                depth_cross=1, num_experts=1, moe_layers_modality=(), moe_layers_cross=(), global_pool="avg",
                preprocessing=CSMAE_BEN1),
]


def list_models() -> list[str]:
    return sorted(REGISTRY)


def get_config(name: str) -> CSMoEConfig:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None
