"""The model side of preprocessing: operations on torch batches, on the encoder's device."""

from __future__ import annotations


def resize_batch(x, size: int):
    """Resize a (B, C, H, W) torch batch to size x size, once per batch. Bilinear, no antialias
    when upsampling (BigEarthNet 120 px -> 224 px model input)."""
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
