"""The torch side of a model's preprocessing: raw reader values -> the model's input, on its device.

    x = prepare(raw, "s2", config.preprocessing, config.img_size, "cuda")   # (B, C, img, img) float32

One call per batch: the raw integers travel to the device (pinned and asynchronous on a GPU), and
upsampling, band order, transpose, normalisation and the resize all run there. The order of the
steps is CSMAE's: upsample 20 m bands, order the channels, transpose, normalise, then resize (the
resize is linear per channel, so it commutes with the normalisation; CSMoE's order, normalise then
resize, gives the same values).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rsretrieve.preprocess import Preprocessing, RawPixels

__all__ = ["Uploaded", "finish", "prepare", "resize_batch", "upload", "upsample"]


def _send(array: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    """The raw bytes of an array on `device`, still raw (uint16 as its 16 bits in an int16 tensor:
    half the bytes of float32, and no reliance on uint16 kernels). Pinned and asynchronous to a GPU."""
    if array is None:
        return None
    array = np.ascontiguousarray(array)
    x = torch.from_numpy(array.view(np.int16) if array.dtype == np.uint16 else array)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _widen(x: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    if dtype == np.uint16:
        return (x.to(torch.int32) & 0xFFFF).to(torch.float32)
    return x.to(torch.float32)


class Uploaded:
    """Raw pixels already on the device (`upload`), waiting for `finish`."""

    def __init__(self, raw: RawPixels, device: torch.device):
        self.raw = raw
        self.fine = _send(raw.fine, device)
        self.coarse = _send(raw.coarse, device)


def upload(raw: RawPixels, device: str | torch.device = "cpu") -> Uploaded:
    """Start the copy of a raw batch to the device (asynchronous on a GPU: call it on a side
    stream to overlap the copy of the next batch with the model's work on this one)."""
    return Uploaded(raw, torch.device(device))


def upsample(x: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, size, size). `nearest` equals pixel repetition for integer factors
    (BigEarthNet's 120_nearest); `bicubic-align-corners` is CSMAE's F.interpolate call."""
    if x.shape[-2:] == (size, size):
        return x
    if method == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest")
    if method == "bicubic-align-corners":
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)
    raise ValueError(f"unknown upsampling {method!r}")


def resize_batch(x: torch.Tensor, size: int, method: str = "bilinear") -> torch.Tensor:
    """Resize a (B, C, H, W) batch to size x size, once per batch; antialiased only when shrinking."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode=method, align_corners=False, antialias=x.shape[-1] > size)


def prepare(raw: RawPixels, modality: str, preprocessing: Preprocessing, img_size: int,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Raw pixels of one modality -> the model's normalised input (B, C, img_size, img_size)."""
    return finish(upload(raw, device), modality, preprocessing, img_size)


def finish(uploaded: Uploaded, modality: str, preprocessing: Preprocessing, img_size: int) -> torch.Tensor:
    """The model's preprocessing of a batch already on the device."""
    raw = uploaded.raw
    wanted = preprocessing.bands(modality)
    missing = [b for b in wanted if b not in raw.bands]
    if missing:
        raise ValueError(f"{preprocessing.name}: the batch lacks band(s) {', '.join(missing)} (it has {', '.join(raw.bands)})")
    fine = _widen(uploaded.fine, raw.fine.dtype)
    size = fine.shape[-1]
    channels = {name: fine[:, i] for i, name in enumerate(raw.fine_bands)}
    if uploaded.coarse is not None and any(b in wanted for b in raw.coarse_bands):
        coarse = upsample(_widen(uploaded.coarse, raw.coarse.dtype), size, preprocessing.upsample)
        channels.update({name: coarse[:, i] for i, name in enumerate(raw.coarse_bands)})
    x = torch.stack([channels[b] for b in wanted], dim=1)
    if preprocessing.transpose:
        x = x.transpose(-1, -2)
    mean, std = (torch.from_numpy(v).to(x.device)[None, :, None, None] for v in preprocessing.mean_std(modality))
    x = (x - mean) / std
    return resize_batch(x, img_size, preprocessing.resize)
