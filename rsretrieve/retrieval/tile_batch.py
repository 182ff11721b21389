"""Many query tiles to query vectors, with the model called on batches gathered across tiles.

A tile's vector is the mean of its valid patches' L2-normalised embeddings (docs/DATASETS.md). Tiles
are read strip by strip (`datasets.tile.TileReader.iter_patches`); the strips' patches wait in a
queue per modality until `batch_size` of them are there, so a hundred one-patch tiles make four
model calls of 32, not a hundred of one, and a 10,980 px tile still never sits in memory whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import DataError
from rsretrieve.pixels import RawPixels

Embed = Callable[[RawPixels, Modality], np.ndarray]


@dataclass
class TileVector:
    """One tile's running sum of unit embeddings, and what its label says."""

    path: Path
    modality: Modality
    width: int
    height: int
    resized: bool
    total: np.ndarray | None = None  # float64 sum of the unit-length patch embeddings
    count: int = 0
    skipped: int = 0
    first: RawPixels | None = field(default=None, repr=False)

    @property
    def vector(self) -> np.ndarray:
        return (self.total / self.count).astype(np.float32)

    @property
    def label(self) -> str:
        n = f"{self.count} patch{'es' if self.count > 1 else ''}" + (f", {self.skipped} skipped" if self.skipped else "")
        size = f"{self.width} x {self.height} px" + (", resized" if self.resized else "")
        return f"{self.path.name} ({self.modality.upper()}, {size}, {n})"

    def add(self, embeddings: np.ndarray) -> None:
        unit = embeddings.astype(np.float64)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        self.total = unit.sum(axis=0) if self.total is None else self.total + unit.sum(axis=0)
        self.count += len(unit)


class _Queue:
    """Patches waiting for the model, per modality and layout: S1 and S2 tiles may be mixed, and a
    patch folder's S2 pixels (20 m bands apart) do not stack with a GeoTIFF's (all at 10 m)."""

    def __init__(self, embed: Embed, batch_size: int):
        self.embed, self.batch_size = embed, batch_size
        self.waiting: dict[tuple, list[tuple[TileVector, RawPixels]]] = {}

    def put(self, tile: TileVector, pixels: RawPixels) -> None:
        key = (tile.modality, pixels.fine_bands, pixels.coarse_bands, pixels.fine.dtype.str)
        queue = self.waiting.setdefault(key, [])
        queue.append((tile, pixels))
        if sum(len(p) for _, p in queue) >= self.batch_size:
            self.flush(key)

    def flush(self, key: tuple | None = None) -> None:
        for one in [key] if key else list(self.waiting):
            queue = self.waiting.pop(one, [])
            if not queue:
                continue
            embeddings = self.embed(RawPixels.concat([p for _, p in queue]), one[0])
            start = 0
            for tile, pixels in queue:  # each tile's rows of the batch, in the order they came
                tile.add(embeddings[start : start + len(pixels)])
                start += len(pixels)


def embed_tiles(paths: Sequence[str | Path], embed: Embed, modality: Modality | None = None, *, batch_size: int = 32,
                keep_first: bool = False, skip_bad: bool = False) -> tuple[list[TileVector | None], list[tuple[str, str]]]:
    """(a TileVector per path, None where the tile failed; (path, one-line reason) of the failed).
    A DataError stops everything unless `skip_bad`: then the tile is left out and the rest go on."""
    from rsretrieve.datasets.tile import open_tile

    queue = _Queue(embed, batch_size)
    tiles: list[TileVector | None] = []
    failed: list[tuple[str, str]] = []
    for path in paths:
        try:
            reader = open_tile(path, modality)
            tile = TileVector(Path(path), reader.modality, reader.width, reader.height, reader.resized)
            for strip in reader.iter_patches():  # DataError at the end when no patch was valid
                tile.skipped += len(strip.skipped)
                if len(strip.pixels):
                    tile.first = strip.pixels.take([0]) if keep_first and tile.first is None else tile.first
                    queue.put(tile, strip.pixels)
            tiles.append(tile)
        except DataError as exc:
            if not skip_bad:
                raise
            tiles.append(None)  # patches of it still queued are embedded, and dropped with it
            failed.append((str(path), str(exc)))
    queue.flush()
    return tiles, failed


__all__ = ["TileVector", "embed_tiles"]
