"""Band specifications and normalisation for Sentinel-1 and Sentinel-2 inputs, in one place.

S2: the ten 10 m and 20 m bands, 20 m bands upsampled to 10 m with nearest neighbour (BigEarthNet's
"120_nearest"). S1: VV and VH backscatter in dB. Statistics are BigEarthNet-v2's train split.
"""

from typing import Literal

import numpy as np

Modality = Literal["s1", "s2"]
MODALITIES: tuple[Modality, ...] = ("s1", "s2")

S1_BANDS: tuple[str, ...] = ("VV", "VH")
S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S2_10M: frozenset[str] = frozenset({"B02", "B03", "B04", "B08"})
S2_60M: tuple[str, ...] = ("B01", "B09")  # in the release, not used by the model
PATCH_SIZE = 120  # BigEarthNet patch side at 10 m

# (mean, std) per band, BigEarthNet-v2 train split, 20 m bands upsampled with nearest neighbour.
BAND_STATS: dict[str, tuple[float, float]] = {
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


def bands_for(modality: Modality) -> tuple[str, ...]:
    if modality == "s1":
        return S1_BANDS
    if modality == "s2":
        return S2_BANDS
    raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")


def native_size(band: str) -> int:
    """Side length in pixels of a band in a BigEarthNet patch at its native resolution."""
    if band in S1_BANDS or band in S2_10M:
        return PATCH_SIZE
    if band in S2_60M:
        return PATCH_SIZE // 6
    return PATCH_SIZE // 2


def upsample_nearest(band: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor (20 m -> 10 m is a factor 2)."""
    factor, remainder = divmod(size, band.shape[-1])
    if remainder or band.shape[-2] * factor != size:
        raise ValueError(f"cannot upsample {band.shape} to {size} px by an integer factor")
    return band.repeat(factor, axis=-2).repeat(factor, axis=-1)


def normalisation(modality: Modality) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std, in the channel order of `bands_for(modality)`."""
    names = bands_for(modality)
    mean = np.array([BAND_STATS[b][0] for b in names], dtype=np.float32)
    std = np.array([BAND_STATS[b][1] for b in names], dtype=np.float32)
    return mean, std


def normalise(pixels: np.ndarray, modality: Modality) -> np.ndarray:
    """(..., C, H, W) raw values (S2 reflectance DN, S1 dB) -> float32 standardised."""
    mean, std = normalisation(modality)
    if pixels.shape[-3] != len(mean):
        raise ValueError(f"{modality} expects {len(mean)} bands, got {pixels.shape[-3]}")
    return ((pixels.astype(np.float32) - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def normalisation_attrs() -> dict[str, object]:
    """Self-describing record of the normalisation, for store attributes."""
    return {
        "s1_bands": list(S1_BANDS),
        "s2_bands": list(S2_BANDS),
        "s2_resampling": "20 m bands upsampled to 10 m with nearest neighbour",
        "s1_units": "dB",
        "stats": {band: list(stat) for band, stat in BAND_STATS.items()},
        "stats_source": "BigEarthNet-v2 train split (120_nearest)",
    }


def resize_batch(x, size: int):
    """Resize a (B, C, H, W) torch batch to size x size, once per batch. Bilinear, no antialias
    when upsampling (BigEarthNet 120 px -> 224 px model input)."""
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
