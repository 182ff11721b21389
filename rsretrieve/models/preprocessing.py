"""The torch side of a model's preprocessing: raw reader values -> the model's input, on its device.

    x = prepare(raw, "s2", config.preprocessing, config.img_size, "cuda")   # (B, C, img, img) float32

One call per batch: the raw integers travel to the device (pinned and asynchronous on a GPU), and
upsampling, band order, transpose, normalisation and the resize all run there. The order of the
steps is CSMAE's: upsample 20 m bands, order the channels, transpose, normalise, then resize (the
resize is linear per channel, so it commutes with the normalisation; CSMoE's order, normalise then
resize, gives the same values).

20 m bands cut around an odd window of a larger cell (`RawPixels.coarse_cell`, Major TOM) are
upsampled by `upsample_cells`: the values that upsampling the whole cell with the model's method
(F.interpolate) would give at the window, computed from the shipped block alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rsretrieve.pixels import RawPixels
from rsretrieve.recipes import Preprocessing

__all__ = ["Uploaded", "finish", "prepare", "resize_batch", "upload", "upsample", "upsample_cells"]


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
        self.cell = _send(raw.coarse_cell, device)  # (B, 6) int32: where each 20 m block lies in its cell

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors (a side stream's copies must be kept until the main stream used them)."""
        return [t for t in (self.fine, self.coarse, self.cell) if t is not None]


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


# A of torch's cubic convolution (aten UpSample.h: upsample_bicubic2d uses -0.75)
CUBIC_A = -0.75


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """(..., 4) weights of the taps at floor(x) - 1 .. floor(x) + 2 for the fraction t = x - floor(x),
    as aten's get_cubic_upsample_coefficients computes them (float32)."""
    a = CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far((1 - t) + 1)], dim=-1)  # aten's own sums, for its rounding


def _taps(n: torch.Tensor, origin: torch.Tensor, top: torch.Tensor, size: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, per patch: the block indices (B, size, T) and weights (B, size, T) that
    upsampling the whole cell (n 20 m px -> 2n 10 m px) gives at 10 m px origin .. origin + size - 1.
    Source positions, index clamping at the cell's border and weights follow aten's kernels
    (float32), so the values equal F.interpolate's on the whole cell to rounding."""
    dst = origin[:, None].to(torch.int64) + torch.arange(size, device=origin.device)  # (B, size) 10 m px in the cell
    n64, top64 = n[:, None].to(torch.int64), top[:, None].to(torch.int64)
    if method == "nearest":  # output exactly twice the input: aten's nearest_idx takes dst >> 1
        return ((dst >> 1) - top64)[..., None], torch.ones(dst.shape + (1,), device=dst.device)
    if method != "bicubic-align-corners":
        raise ValueError(f"unknown upsampling {method!r}")
    scale = (n64 - 1).to(torch.float32) / (2 * n64 - 1).to(torch.float32)  # align_corners: (in - 1) / (out - 1)
    x = scale * dst.to(torch.float32)
    base = torch.minimum(torch.floor(x).to(torch.int64), n64 - 1)
    t = (x - base.to(torch.float32)).clamp(0, 1)
    index = (base[..., None] + torch.arange(-1, 3, device=dst.device)).clamp(min=0)
    index = torch.minimum(index, n64[..., None] - 1) - top64[..., None]
    return index, _cubic_weights(t)


def upsample_cells(blocks: torch.Tensor, cell: torch.Tensor, size: int, method: str) -> torch.Tensor:
    """(B, C, K, K) 20 m blocks and their (B, 6) cells (`RawPixels.coarse_cell`) -> (B, C, size, size):
    each cell upsampled whole by `method` and cut at its window, computed from the block alone.
    Separable, one gather per tap (memory stays a few blocks); gathers rather than a matmul with
    an interpolation matrix, which TF32 would round (and nearest would no longer be exact)."""
    b, c, k, _ = blocks.shape
    rows, row_w = _taps(cell[:, 0], cell[:, 2], cell[:, 4], size, method)
    cols, col_w = _taps(cell[:, 1], cell[:, 3], cell[:, 5], size, method)
    wide = None  # along W first, then H: aten's order of the sums, so rounding is alike too
    for j in range(cols.shape[-1]):
        part = torch.gather(blocks, 3, cols[:, None, None, :, j].expand(b, c, k, size)) * col_w[:, None, None, :, j]
        wide = part if wide is None else wide + part
    out = None
    for j in range(rows.shape[-1]):
        part = torch.gather(wide, 2, rows[:, None, :, j, None].expand(b, c, size, size)) * row_w[:, None, :, j, None]
        out = part if out is None else out + part
    return out


def _upsample_batch(coarse: torch.Tensor, raw: RawPixels, cell: torch.Tensor | None, size: int, method: str) -> torch.Tensor:
    """The 20 m bands of a batch on the 10 m grid: patches that are their own cell (BigEarthNet,
    windows on the 20 m grid) through `upsample`, as ever; the others through `upsample_cells`."""
    if raw.coarse_cell is None:
        return upsample(coarse, size, method)
    half = size // 2
    own = np.all(raw.coarse_cell == np.array([half, half, 0, 0, 0, 0]), axis=1)
    if own.all():
        return upsample(coarse[..., :half, :half], size, method)
    out = coarse.new_empty(coarse.shape[:2] + (size, size))
    own_rows = torch.from_numpy(np.flatnonzero(own)).to(coarse.device)
    other = torch.from_numpy(np.flatnonzero(~own)).to(coarse.device)
    if len(own_rows):
        out[own_rows] = upsample(coarse[own_rows, :, :half, :half], size, method)
    out[other] = upsample_cells(coarse[other], cell[other], size, method)
    return out


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
        coarse = _upsample_batch(_widen(uploaded.coarse, raw.coarse.dtype), raw, uploaded.cell, size, preprocessing.upsample)
        channels.update({name: coarse[:, i] for i, name in enumerate(raw.coarse_bands)})
    x = torch.stack([channels[b] for b in wanted], dim=1)
    if preprocessing.transpose:
        x = x.transpose(-1, -2)
    mean, std = (torch.from_numpy(v).to(x.device)[None, :, None, None] for v in preprocessing.mean_std(modality))
    x = (x - mean) / std
    return resize_batch(x, img_size, preprocessing.resize)
