"""Band names and native sizes of Sentinel-1 and Sentinel-2 inputs, in one place.

S2: the ten 10 m and 20 m bands (20 m bands are 60 px in a BigEarthNet patch). S1: VV and VH
backscatter in dB. Statistics and resizing belong to a model's preprocessing (`recipes.py`).
"""

from typing import Literal

import numpy as np

Modality = Literal["s1", "s2"]
MODALITIES: tuple[Modality, ...] = ("s1", "s2")

S1_BANDS: tuple[str, ...] = ("VV", "VH")
S2_BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
S2_10M: frozenset[str] = frozenset({"B02", "B03", "B04", "B08"})
S2_FINE: tuple[str, ...] = ("B02", "B03", "B04", "B08")  # 10 m bands, in S2_BANDS order
S2_COARSE: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")  # 20 m bands, in S2_BANDS order
S2_60M: tuple[str, ...] = ("B01", "B09")  # in the release, not used by the model
PATCH_SIZE = 120  # BigEarthNet patch side at 10 m


def bands_for(modality: Modality) -> tuple[str, ...]:
    if modality == "s1":
        return S1_BANDS
    if modality == "s2":
        return S2_BANDS
    raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")


def band_groups(modality: Modality) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(bands at 10 m, bands at 20 m) of a modality, as readers ship them (`pixels.RawPixels`)."""
    if modality == "s1":
        return S1_BANDS, ()
    if modality == "s2":
        return S2_FINE, S2_COARSE
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
