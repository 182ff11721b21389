"""A PNG mosaic of a query patch beside its top results (Pillow only).

Patches come raw, as readers ship them (`pixels.RawPixels`, or a (C, H, W) array in
`bands.bands_for(modality)` order). S2 renders as true colour (B04, B03, B02 in reflectance DN),
stretched jointly over the three channels (2-98 % percentiles by default;
`stretch="fixed"` maps 0-3000 DN with gamma 1/1.6). S1 renders as a false-colour composite
R = VV in [-25, 0] dB, G = VH in [-32, -5] dB, B = VV - VH (the VV/VH ratio in dB) in [0, 15] dB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsretrieve.bands import Modality, bands_for
from rsretrieve.pixels import RawPixels

S1_RANGES_DB = {"VV": (-25.0, 0.0), "VH": (-32.0, -5.0), "ratio": (0.0, 15.0)}
S2_FIXED_MAX_DN = 3000.0
S2_GAMMA = 1 / 1.6

SCALE = 2  # nearest-neighbour upscaling of each tile
FRAME = 4  # frame width around each tile
GAP = 10  # space between cells and around the mosaic
TEXT_LINES = 4  # id line + up to 3 lines of labels
LINE_HEIGHT = 12
QUERY_FRAME = (230, 60, 30)
RESULT_FRAME = (200, 200, 200)
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _bands(pixels: RawPixels | np.ndarray, names: Sequence[str], modality: Modality, index: int) -> np.ndarray:
    """The named bands of one patch as float32 (len(names), H, W)."""
    if isinstance(pixels, RawPixels):
        return np.stack([pixels.band(name)[index] for name in names]).astype(np.float32)
    pixels = np.asarray(pixels, dtype=np.float32)
    order = bands_for(modality)
    if pixels.ndim != 3 or pixels.shape[0] != len(order):
        raise ValueError(f"{modality} pixels must be ({len(order)}, H, W) in {order} order, got {pixels.shape}")
    return pixels[[order.index(name) for name in names]]


def _scale(x: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x - low) / (high - low), 0.0, 1.0).astype(np.float32)


def to_rgb(pixels: RawPixels | np.ndarray, modality: Modality, stretch: str = "percentile", index: int = 0) -> np.ndarray:
    """A raw patch (patch `index` of a RawPixels, or a (C, H, W) array) -> uint8 (H, W, 3)."""
    if modality == "s2":
        rgb = np.nan_to_num(_bands(pixels, ("B04", "B03", "B02"), modality, index), nan=0.0)
        if stretch == "percentile":
            low, high = np.percentile(rgb, [2, 98])
            out = _scale(rgb, float(low), float(high))
        elif stretch == "fixed":
            out = _scale(rgb, 0.0, S2_FIXED_MAX_DN) ** S2_GAMMA
        else:
            raise ValueError(f"unknown stretch {stretch!r}; expected 'percentile' or 'fixed'")
    elif modality == "s1":
        vv, vh = np.nan_to_num(_bands(pixels, ("VV", "VH"), modality, index), nan=0.0)
        out = np.stack([
            _scale(vv, *S1_RANGES_DB["VV"]),
            _scale(vh, *S1_RANGES_DB["VH"]),
            _scale(vv - vh, *S1_RANGES_DB["ratio"]),
        ])
    else:
        raise ValueError(f"unknown modality {modality!r}; expected 's1' or 's2'")
    return np.ascontiguousarray((np.transpose(out, (1, 2, 0)) * 255 + 0.5).astype(np.uint8))


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1: bitmap font, no size
        return ImageFont.load_default()


def _fit_lines(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Wrap `text` to `width` pixels in at most `max_lines` lines, the last one truncated with '…'."""
    if not text:
        return []
    lines: list[str] = []
    for paragraph in text.split("\n"):
        words = paragraph.split(" ")
        current = ""
        for word in words:
            trial = f"{current} {word}".strip()
            if draw.textlength(trial, font=font) <= width or not current:
                current = trial
            else:
                lines.append(current)
                current = word
        lines.append(current)
    lines = [_truncate(draw, line, font, width) for line in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _truncate(draw, lines[-1] + " …", font, width, force=True)
    return lines


def _truncate(draw, line: str, font, width: int, force: bool = False) -> str:
    if draw.textlength(line, font=font) <= width and not force:
        return line
    if force and draw.textlength(line, font=font) <= width:
        return line
    while line and draw.textlength(line + "…", font=font) > width:
        line = line[:-1]
    return line + "…"


def mosaic_size(n_results: int, tile: int = 120, scale: int = SCALE, columns: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of a mosaic of the query and `n_results` tiles of `tile` px."""
    cells = 1 + n_results
    columns = cells if columns is None else max(1, min(columns, cells))
    rows = -(-cells // columns)
    cell_w = tile * scale + 2 * FRAME
    cell_h = cell_w + TEXT_LINES * LINE_HEIGHT + 4
    return GAP + columns * (cell_w + GAP), GAP + rows * (cell_h + GAP)


def render_mosaic(
    query: RawPixels | np.ndarray,
    query_modality: Modality,
    results: Sequence[tuple[RawPixels | np.ndarray, Modality, str, str]],
    path: str | Path,
    query_title: str = "query",
    query_subtitle: str = "",
    columns: int | None = None,
    scale: int = SCALE,
    stretch: str = "percentile",
) -> Path:
    """Write a PNG: the query (framed in orange) then each result (thin grey frame), each tile
    upscaled `scale`x with nearest neighbour, its title (patch id) and subtitle (labels, score)
    written under it, wrapped and truncated to the tile width. Tiles are laid out `columns` per row
    (all in one row by default). Tiles of another size are resized to the query's."""
    path = Path(path)
    tile = int((query.fine if isinstance(query, RawPixels) else np.asarray(query)).shape[-1])
    width, height = mosaic_size(len(results), tile, scale, columns)
    cells = 1 + len(results)
    ncols = cells if columns is None else max(1, min(columns, cells))
    cell_w = tile * scale + 2 * FRAME
    cell_h = cell_w + TEXT_LINES * LINE_HEIGHT + 4
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    entries = [(query, query_modality, query_title, query_subtitle, True)] + [(p, m, t, s, False) for p, m, t, s in results]
    for i, (pixels, modality, title, subtitle, is_query) in enumerate(entries):
        col, row = i % ncols, i // ncols
        x0, y0 = GAP + col * (cell_w + GAP), GAP + row * (cell_h + GAP)
        rgb = Image.fromarray(to_rgb(pixels, modality, stretch=stretch))
        rgb = rgb.resize((tile * scale, tile * scale), Image.Resampling.NEAREST)
        frame = QUERY_FRAME if is_query else RESULT_FRAME
        frame_width = FRAME if is_query else 1
        draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_w - 1], fill=BACKGROUND)
        draw.rectangle([x0 + FRAME - frame_width, y0 + FRAME - frame_width,
                        x0 + FRAME + tile * scale + frame_width - 1, y0 + FRAME + tile * scale + frame_width - 1], fill=frame)
        image.paste(rgb, (x0 + FRAME, y0 + FRAME))
        head = f"{'QUERY ' if is_query else ''}[{modality.upper()}] {title}"
        lines = _fit_lines(draw, head, font, cell_w, 1) + _fit_lines(draw, subtitle, font, cell_w, TEXT_LINES - 1)
        for j, line in enumerate(lines[:TEXT_LINES]):
            draw.text((x0, y0 + cell_w + 2 + j * LINE_HEIGHT), line, fill=QUERY_FRAME if (is_query and j == 0) else TEXT, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def labels_subtitle(labels: Sequence[str], score: float | None = None) -> str:
    """'0.912 | Arable land; Pastures; …' — the usual subtitle of a result tile."""
    text = "; ".join(labels) if labels else "(no labels)"
    return text if score is None else f"{score:.3f} | {text}"


__all__ = ["to_rgb", "render_mosaic", "mosaic_size", "labels_subtitle"]
