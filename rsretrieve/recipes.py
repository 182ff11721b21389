"""What a model does to raw band values before its first layer: its preprocessing recipe.

A model owns a frozen `Preprocessing` (held by its config, written into checkpoints and store
provenance): its band order per modality, the statistics it was trained with, how 20 m bands are
upsampled, how a patch is resized to the model's input size, and any transpose. The encoder
applies it on its device, once per batch (`rsretrieve.models.preprocessing.prepare`), so every
path - the archive, a query tile, an evaluation - embeds pixels the same way.

Registered preprocessings:

- ``benv2-nearest`` (CSMoE): BigEarthNet-v2 train-split statistics with 20 m bands upsampled by
  nearest neighbour (as the CSMoE paper states); S2 B02 B03 B04 B05 B06 B07 B08 B8A B11 B12, S1
  VV VH; bilinear resize to the input size (our guess: the paper names none).
- ``csmae-ben1`` (CSMAE's published code, jakhac/CSMAE): S2 B02 B03 B04 B08 B05 B06 B07 B11 B12 B8A,
  S1 VH VV; BigEarthNet v1 statistics (`bigearthnet_common.constants` 2.8.0); every band bicubic
  upsampled with align_corners=True; H and W transposed; bicubic resize; then normalised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsretrieve.bands import S1_BANDS, S2_BANDS, Modality

UPSAMPLE_METHODS = ("nearest", "bicubic-align-corners")
RESIZE_METHODS = ("bilinear", "bicubic")

# (mean, std) per band, BigEarthNet-v2 train split, 20 m bands upsampled with nearest neighbour.
BENV2_STATS: dict[str, tuple[float, float]] = {
    "B02": (438.372, 607.027),
    "B03": (614.056, 603.297),
    "B04": (588.410, 684.569),
    "B05": (942.843, 738.433),
    "B06": (1769.932, 1100.456),
    "B07": (2049.552, 1275.805),
    "B08": (2193.292, 1369.372),
    "B8A": (2235.557, 1356.544),
    "B11": (1568.227, 1070.161),
    "B12": (997.732, 813.528),
    "VH": (-19.3526, 5.5905),
    "VV": (-12.6439, 5.1335),
}

# (mean, std) per band, BigEarthNet v1 (bigearthnet_common 2.8.0 `BAND_STATS_S1/S2`), as CSMAE uses.
BEN1_STATS: dict[str, tuple[float, float]] = {
    "B02": (429.9430203, 572.41639287),
    "B03": (614.21682446, 582.87945694),
    "B04": (590.23569706, 675.88746967),
    "B05": (950.68368468, 729.89827633),
    "B06": (1792.46290469, 1096.01480586),
    "B07": (2075.46795189, 1273.45393088),
    "B08": (2218.94553375, 1365.45589904),
    "B8A": (2266.46036911, 1356.13789355),
    "B11": (1594.42694882, 1079.19066363),
    "B12": (1009.32729131, 818.86747235),
    "VH": (-19.29044597721542, 5.464428464912864),
    "VV": (-12.619993741972035, 5.115911777546365),
}


@dataclass(frozen=True)
class Preprocessing:
    """A model's input preprocessing (frozen, JSON round-trip; see the module docstring)."""

    name: str
    s1_bands: tuple[str, ...] = S1_BANDS
    s2_bands: tuple[str, ...] = S2_BANDS
    stats: tuple[tuple[str, float, float], ...] = tuple((b, m, s) for b, (m, s) in BENV2_STATS.items())
    stats_source: str = "BigEarthNet-v2 train split (120_nearest)"
    upsample: str = "nearest"  # how 20 m bands reach 10 m: one of UPSAMPLE_METHODS
    resize: str = "bilinear"  # patch -> the model's input size: one of RESIZE_METHODS
    transpose: bool = False  # swap H and W before the model (CSMAE's data module does)
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "s1_bands", tuple(self.s1_bands))
        object.__setattr__(self, "s2_bands", tuple(self.s2_bands))
        object.__setattr__(self, "stats", tuple((str(b), float(m), float(s)) for b, m, s in self.stats))
        if self.upsample not in UPSAMPLE_METHODS:
            raise ValueError(f"{self.name}: upsample must be one of {UPSAMPLE_METHODS}, got {self.upsample!r}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"{self.name}: resize must be one of {RESIZE_METHODS}, got {self.resize!r}")
        known = {b for b, _, _ in self.stats}
        missing = [b for b in (*self.s1_bands, *self.s2_bands) if b not in known]
        if missing:
            raise ValueError(f"{self.name}: no statistics for band(s) {', '.join(missing)}")

    def bands(self, modality: Modality) -> tuple[str, ...]:
        """The model's channel order for a modality."""
        if modality == "s1":
            return self.s1_bands
        if modality == "s2":
            return self.s2_bands
        raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")

    def mean_std(self, modality: Modality) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std (float32), in the model's channel order."""
        table = {b: (m, s) for b, m, s in self.stats}
        names = self.bands(modality)
        return (np.array([table[b][0] for b in names], np.float32), np.array([table[b][1] for b in names], np.float32))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["s1_bands"], d["s2_bands"] = list(self.s1_bands), list(self.s2_bands)
        d["stats"] = [list(row) for row in self.stats]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "Preprocessing":
        if isinstance(d, str):
            return get_preprocessing(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}")
        return cls(**d)


PREPROCESSINGS: dict[str, Preprocessing] = {}


def register_preprocessing(p: Preprocessing) -> Preprocessing:
    PREPROCESSINGS[p.name] = p
    return p


def get_preprocessing(name: str) -> Preprocessing:
    try:
        return PREPROCESSINGS[name]
    except KeyError:
        raise KeyError(f"unknown preprocessing {name!r}; registered: {', '.join(sorted(PREPROCESSINGS))}") from None


BENV2_NEAREST = register_preprocessing(Preprocessing(
    "benv2-nearest",
    notes="CSMoE paper: BENv2 statistics, nearest upsampling of 20 m bands. Band order and the "
          "bilinear resize to the input size are our choices (the paper states neither).",
))
CSMAE_BEN1 = register_preprocessing(Preprocessing(
    "csmae-ben1",
    s1_bands=("VH", "VV"),
    s2_bands=("B02", "B03", "B04", "B08", "B05", "B06", "B07", "B11", "B12", "B8A"),
    stats=tuple((b, m, s) for b, (m, s) in BEN1_STATS.items()),
    stats_source="BigEarthNet v1 (bigearthnet_common 2.8.0 BAND_STATS_S1/S2)",
    upsample="bicubic-align-corners",
    resize="bicubic",
    transpose=True,
    notes="jakhac/CSMAE: BEN_lmdb_utils.BENLMDBReader (bicubic, align_corners=True, every band), "
          "BEN_DataModule_LMDB_Encoder (np.transpose(img, (2, 1, 0)) then ToTensor), "
          "augmentations.build_transform_pipeline (Resize bicubic, Normalize).",
))
