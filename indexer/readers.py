"""Read tasks: a data chunk -> its raw `PatchBatch`, on a reader worker (any core of any node).

A reader process opens each dataset once (`DatasetSpec.open`, cached per process) and ships raw
values (`pixels.RawPixels`: 158 KB per S2 patch from BigEarthNet, uint16), never normalised
float32, to the encoder worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from rsretrieve.datasets import Chunk, PatchBatch, open_dataset

_LOCK = threading.Lock()
_DATASETS: dict = {}


@dataclass(frozen=True)
class DatasetSpec:
    """How a worker opens the dataset: picklable, reopened once per process."""

    name: str
    root: str | None = None
    subset: str | None = None
    options: tuple[tuple[str, object], ...] = ()  # reader options, e.g. (("chunk_size", 64),)

    def open(self):
        key = (self.name, self.root, self.subset, self.options)
        with _LOCK:
            if key not in _DATASETS:
                _DATASETS[key] = open_dataset(self.name, self.root or None, self.subset, **dict(self.options))
            return _DATASETS[key]

    def to_dict(self) -> dict:
        return {"name": self.name, "root": self.root, "subset": self.subset, "options": dict(self.options)}


def read_chunk(dataset: DatasetSpec, chunk: Chunk, read_hook: Callable[[Chunk], None] | None = None) -> PatchBatch:
    """The task a reader worker runs. `read_hook(chunk)` runs first (tests inject faults with it)."""
    if read_hook is not None:
        read_hook(chunk)
    return dataset.open().read_chunk(chunk)
