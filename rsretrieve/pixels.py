"""The raw values readers ship to the model's side: `RawPixels`.

Readers deliver `RawPixels`: raw physical values (S2 digital numbers as uint16, S1 backscatter in
dB as float32) of a declared band set, each band at its native size: the 10 m bands (and S1) at
the patch size in `fine`, the 20 m bands at half that size in `coarse` (when the source has them
at native resolution; a multi-band query GeoTIFF already has every band on the 10 m grid).

A patch whose 10 m window starts at an odd pixel of a larger cell (Major TOM's fragmenter: 105,
315, ... in a 1068 px cell) has no whole 20 m crop. For it the reader ships a block of the cell's
20 m pixels around the window and the window's place in the cell (`coarse_cell`, `cut_windows`);
the model's preprocessing then upsamples exactly as if the whole cell were upsampled by its own
method and cut at the window (`rsretrieve.models.preprocessing.upsample_cells`). Never the reader:
readers do not know the model's method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsretrieve.bands import Modality, bands_for

# 20 m px shipped around an odd window's 20 m footprint (clamped into the cell): the 4-tap support
# of bicubic at any align-corners phase needs 1 px before and 2 after; 3 leaves room for both
COARSE_MARGIN = 3
CELL_COLUMNS = ("cell_h", "cell_w", "row", "col", "top", "left")  # RawPixels.coarse_cell, per patch


@dataclass
class RawPixels:
    """Raw band values of B patches (see the module docstring). `fine` (B, C, S, S) holds the bands
    named in `fine_bands`; `coarse` the 20 m bands named in `coarse_bands`.

    Without `coarse_cell`, `coarse` is (B, C', S/2, S/2): each patch's own 20 m pixels, upsampled
    as a patch of its own (BigEarthNet). With it, `coarse` is (B, C', K, K), K >= S/2, and
    `coarse_cell` (B, 6) int32 holds per patch `CELL_COLUMNS`: the cell's 20 m size (cell_h,
    cell_w), the window's 10 m origin in the cell (row, col), and the origin of the block
    `coarse[b]` in the cell's 20 m grid (top, left). The patch's 20 m bands on the 10 m grid are
    then the cell upsampled whole to (2 cell_h, 2 cell_w) by the model's method and cut at
    (row, col, S, S); block pixels beyond the cell are padding, never read. A row
    (S/2, S/2, 0, 0, 0, 0) is a patch that is its own cell, as without `coarse_cell`."""

    fine: np.ndarray
    fine_bands: tuple[str, ...]
    coarse: np.ndarray | None = None
    coarse_bands: tuple[str, ...] = ()
    coarse_cell: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.fine_bands, self.coarse_bands = tuple(self.fine_bands), tuple(self.coarse_bands)
        if self.fine.ndim != 4 or self.fine.shape[1] != len(self.fine_bands):
            raise ValueError(f"fine pixels {self.fine.shape} do not match bands {self.fine_bands}")
        if self.coarse is not None and (self.coarse.ndim != 4 or self.coarse.shape[1] != len(self.coarse_bands)
                                        or len(self.coarse) != len(self.fine)):
            raise ValueError(f"coarse pixels {self.coarse.shape} do not match bands {self.coarse_bands}")
        if self.coarse_cell is not None:
            self.coarse_cell = np.asarray(self.coarse_cell, np.int32)
            _check_cells(self.coarse_cell, self.coarse, self.fine.shape[-1])

    def __len__(self) -> int:
        return len(self.fine)

    @property
    def bands(self) -> tuple[str, ...]:
        return self.fine_bands + self.coarse_bands

    def take(self, rows) -> "RawPixels":
        coarse = self.coarse[rows] if self.coarse is not None else None
        cell = self.coarse_cell[rows] if self.coarse_cell is not None else None
        return RawPixels(self.fine[rows], self.fine_bands, coarse, self.coarse_bands, cell)

    def band(self, name: str) -> np.ndarray:
        """One band of every patch as shipped, (B, h, w): at its native size (a 20 m band with
        `coarse_cell`: the blocks, see the class docstring)."""
        if name in self.fine_bands:
            return self.fine[:, self.fine_bands.index(name)]
        if name in self.coarse_bands:
            return self.coarse[:, self.coarse_bands.index(name)]
        raise KeyError(f"band {name} is not in this batch ({', '.join(self.bands)})")

    def stacked(self, bands: tuple[str, ...] | None = None) -> np.ndarray:
        """(B, C, S, S) float32 of the named bands (default: all, fine then coarse) on the 10 m grid,
        20 m bands repeated 2 x 2 (nearest neighbour, at the window's phase in its cell): a
        reference view for checks and pictures; a model upsamples with its own method."""
        size = self.fine.shape[-1]
        out = np.empty((len(self), len(bands or self.bands), size, size), np.float32)
        for i, name in enumerate(bands or self.bands):
            band = self.band(name)
            if name in self.coarse_bands and self.coarse_cell is not None:
                out[:, i] = _nearest_in_cells(band, self.coarse_cell, size)
                continue
            factor = size // band.shape[-1]
            out[:, i] = band if factor == 1 else band.repeat(factor, axis=-2).repeat(factor, axis=-1)
        return out

    def with_cells(self, k: int) -> "RawPixels":
        """The same patches with `coarse_cell`, blocks padded to k px (a patch without a cell is its
        own cell), so that batches cut either way concatenate."""
        if self.coarse is None or (self.coarse_cell is not None and self.coarse.shape[-1] == k):
            return self
        n, c, h, w = self.coarse.shape
        coarse = np.zeros((n, c, k, k), self.coarse.dtype)
        coarse[:, :, :h, :w] = self.coarse
        cell = self.coarse_cell if self.coarse_cell is not None else np.tile(np.array([h, w, 0, 0, 0, 0], np.int32), (n, 1))
        return RawPixels(self.fine, self.fine_bands, coarse, self.coarse_bands, cell)

    @staticmethod
    def concat(parts: list["RawPixels"]) -> "RawPixels":
        """One batch from several with the same bands (the encoder batches across chunks)."""
        first = parts[0]
        if any(p.fine_bands != first.fine_bands or p.coarse_bands != first.coarse_bands for p in parts):
            raise ValueError("cannot concatenate batches with different bands")
        if first.coarse is not None and any(p.coarse_cell is not None for p in parts):
            k = max(p.coarse.shape[-1] for p in parts)
            parts = [p.with_cells(k) for p in parts]
        coarse = np.concatenate([p.coarse for p in parts]) if first.coarse is not None else None
        cell = np.concatenate([p.coarse_cell for p in parts]) if parts[0].coarse_cell is not None else None
        return RawPixels(np.concatenate([p.fine for p in parts]), first.fine_bands, coarse, first.coarse_bands, cell)

    @staticmethod
    def empty(modality: Modality, size: int) -> "RawPixels":
        dtype = np.float32 if modality == "s1" else np.uint16
        return RawPixels(np.zeros((0, len(bands_for(modality)), size, size), dtype), bands_for(modality))


def _check_cells(cell: np.ndarray, coarse: np.ndarray | None, size: int) -> None:
    """Every window inside its cell, and every block holding the 20 m pixels a 4-tap kernel reads
    for it (the torch side trusts this, and reads nothing outside the block)."""
    if coarse is None or cell.shape != (len(coarse), 6) or coarse.shape[-2] != coarse.shape[-1] or coarse.shape[-1] < size // 2:
        raise ValueError(f"coarse_cell {cell.shape} does not match coarse pixels {None if coarse is None else coarse.shape}")
    k = coarse.shape[-1]
    for n, origin, top in ((cell[:, 0], cell[:, 2], cell[:, 4]), (cell[:, 1], cell[:, 3], cell[:, 5])):
        first = np.maximum((origin - 1) // 2 - 1, 0)  # the lowest 20 m px a window's upsampling reads
        last = np.minimum((origin + size - 1) // 2 + 2, n - 1)  # the highest
        bad = (origin < 0) | (origin + size > 2 * n) | (top < 0) | (top > first) | (top + k <= last)
        if bad.any():
            raise ValueError(f"coarse_cell row {int(np.flatnonzero(bad)[0])} {cell[np.flatnonzero(bad)[0]].tolist()}: "
                             f"its window or block ({k} px) does not fit its cell")


def _nearest_in_cells(blocks: np.ndarray, cell: np.ndarray, size: int) -> np.ndarray:
    """(B, K, K) blocks -> (B, S, S): each 10 m pixel takes the 20 m pixel it lies in."""
    j = np.arange(size)
    rows = (cell[:, 2, None] + j) // 2 - cell[:, 4, None]
    cols = (cell[:, 3, None] + j) // 2 - cell[:, 5, None]
    return blocks[np.arange(len(blocks))[:, None, None], rows[:, :, None], cols[:, None, :]]


def cut_windows(fine: np.ndarray, fine_bands: tuple[str, ...], coarse: np.ndarray | None, coarse_bands: tuple[str, ...],
                wins: list[tuple[int, int, int, int]]) -> RawPixels:
    """Raw pixels of square windows (row, col, size, size, in 10 m px) of one cell: `fine` (C, H, W)
    on the 10 m grid, `coarse` (C', H/2, W/2) its 20 m bands (None for S1).

    A window whose origin and size are even takes its own 20 m pixels, as a BigEarthNet patch (and
    when all are, `coarse_cell` is left out: the batch is the plain kind). Any other window ships
    a block of the cell's 20 m pixels, its footprint plus `COARSE_MARGIN` on each side (moved
    into the cell at its edges), and its place in the cell (`RawPixels.coarse_cell`)."""
    out_fine = np.stack([fine[:, r : r + h, c : c + w] for r, c, h, w in wins])
    if coarse is None:
        return RawPixels(out_fine, fine_bands)
    even = [all(v % 2 == 0 for v in win) for win in wins]
    if all(even):
        native = np.stack([coarse[:, r // 2 : (r + h) // 2, c // 2 : (c + w) // 2] for r, c, h, w in wins])
        return RawPixels(out_fine, fine_bands, native, coarse_bands)
    size = wins[0][2]
    if any(h != size or w != size for _, _, h, w in wins):
        raise ValueError(f"windows of one batch must be square and of one size, got {sorted({(h, w) for _, _, h, w in wins})}")
    (n_h, n_w), k = coarse.shape[-2:], size // 2 + 2 * COARSE_MARGIN
    blocks = np.zeros((len(wins), len(coarse_bands), k, k), coarse.dtype)
    cells = np.zeros((len(wins), 6), np.int32)
    for i, ((r, c, h, w), own) in enumerate(zip(wins, even)):
        if own:
            blocks[i, :, : h // 2, : w // 2] = coarse[:, r // 2 : (r + h) // 2, c // 2 : (c + w) // 2]
            cells[i] = (h // 2, w // 2, 0, 0, 0, 0)
            continue
        top = min(max(r // 2 - COARSE_MARGIN, 0), max(n_h - k, 0))
        left = min(max(c // 2 - COARSE_MARGIN, 0), max(n_w - k, 0))
        part = coarse[:, top : top + k, left : left + k]
        blocks[i, :, : part.shape[1], : part.shape[2]] = part
        cells[i] = (n_h, n_w, r, c, top, left)
    return RawPixels(out_fine, fine_bands, blocks, coarse_bands, cells)
