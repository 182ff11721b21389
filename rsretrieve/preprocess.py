"""Preprocessing of raw band values into a model's input: statistics and normalisation.

20 m bands upsampled to 10 m with nearest neighbour (BigEarthNet's "120_nearest"); statistics are
BigEarthNet-v2's train split.
"""

from __future__ import annotations

import numpy as np

from rsretrieve.bands import S1_BANDS, S2_BANDS, Modality, bands_for

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
