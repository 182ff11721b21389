"""Mosaic rendering: size, real pictures, both modalities."""

import numpy as np
import pytest
from PIL import Image

from rsretrieve.export.mosaic import labels_subtitle, mosaic_size, render_mosaic, to_rgb


def s2_patch(seed, size=120):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 300 + 2000 * (xx / size) + 500 * np.sin(yy / 9)
    raw = np.stack([base * (0.6 + 0.1 * c) + 80 * rng.standard_normal((size, size)) for c in range(10)])
    return raw.astype(np.float32)


def s1_patch(seed, size=120):
    rng = np.random.default_rng(seed)
    vv = -12 + 4 * rng.standard_normal((size, size))
    vh = -19 + 4 * rng.standard_normal((size, size))
    return np.stack([vv, vh]).astype(np.float32)


@pytest.mark.parametrize("modality", ["s1", "s2"])
def test_to_rgb_is_a_picture(modality):
    patch = s1_patch(0) if modality == "s1" else s2_patch(0)
    rgb = to_rgb(patch, modality)
    assert rgb.shape == (120, 120, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 5  # not constant
    assert len({tuple(c) for c in rgb.reshape(-1, 3)[::97]}) > 10


def test_s2_true_colour_channel_order():
    raw = np.full((10, 8, 8), 500.0)
    raw[2] = 2500  # B04 bright -> red
    rgb = to_rgb(raw, "s2", stretch="fixed")
    assert rgb[..., 0].mean() > rgb[..., 1].mean() + 50 and rgb[..., 0].mean() > rgb[..., 2].mean() + 50


def test_s1_false_colour_ranges():
    raw = np.stack([np.full((4, 4), 0.0), np.full((4, 4), -32.0)])  # VV at top of range, VH at bottom
    rgb = to_rgb(raw, "s1")
    assert rgb[0, 0].tolist() == [255, 0, 255]  # VV high, VH low, VV-VH = 32 dB -> saturated


def test_mosaic_png_size_and_content(tmp_path):
    results = [(s2_patch(i + 1), "s2", f"S2A_MSIL2A_{i:03d}_patch", labels_subtitle(
        ["Arable land", "Land principally occupied by agriculture, with significant areas of natural vegetation",
         "Coniferous forest", "Mixed forest", "Inland waters", "Pastures"], 0.9 - i / 10)) for i in range(3)]
    results.append((s1_patch(9), "s1", "S1A_IW_GRDH_patch", labels_subtitle(["Urban fabric"], 0.5)))
    out = render_mosaic(s1_patch(0), "s1", results, tmp_path / "sub" / "m.png", query_title="S1A_query")
    assert out.exists()
    image = Image.open(out)
    assert image.format == "PNG"
    assert image.size == mosaic_size(4, 120)
    width, height = image.size
    assert width > 5 * 240 and height > 240  # 1 query + 4 results in a row, 2x upscaled
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10
    # the query frame colour is present, and tiles differ from each other
    assert (pixels == np.array([230, 60, 30], np.uint8)).all(axis=2).sum() > 100
    wrapped = tmp_path / "grid.png"
    render_mosaic(s2_patch(0), "s2", results, wrapped, columns=3)
    assert Image.open(wrapped).size == mosaic_size(4, 120, columns=3)
    assert Image.open(wrapped).size[1] > image.size[1]
