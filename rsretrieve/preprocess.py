"""What a model does to raw band values before its first layer, and the raw values readers ship.

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

from rsretrieve.bands import S1_BANDS, S2_BANDS, Modality, bands_for

UPSAMPLE_METHODS = ("nearest", "bicubic-align-corners")
# 20 m px shipped around an odd window's 20 m footprint (clamped into the cell): the 4-tap support
# of bicubic at any align-corners phase needs 1 px before and 2 after; 3 leaves room for both
COARSE_MARGIN = 3
CELL_COLUMNS = ("cell_h", "cell_w", "row", "col", "top", "left")  # RawPixels.coarse_cell, per patch
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


# -- raw values, as readers ship them ------------------------------------------------------------


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


# -- what a model does with them -----------------------------------------------------------------


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
