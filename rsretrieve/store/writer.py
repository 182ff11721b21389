"""Writing an encoder run's chunks into a store group, one whole storage shard at a time.

A Zarr shard is one file: writing part of it means reading and rewriting all of it. Chunk results
(a few hundred rows) therefore wait here until every row of their shard that this run encodes has
arrived; the shard's rows are then written in one go (`embedding`, `valid`, and lat/lon where the
store has none), and only after that are its chunks marked done in the ledger. A shard that also
holds rows of earlier runs is read first, so they are kept.

    with ShardWriter(store, "s2", spans_to_do) as writer:
        for result in results:
            writer.add(span, patch_ids, embeddings, locations)

Leaving the `with` block (normally or by an exception) writes every shard still waiting, so a
failed or interrupted run keeps what it encoded; a kill -9 loses at most the waiting shards, and at
most `FLUSH_EVERY_S` seconds of work, since older waiting shards are written then (their chunks
marked done, the rest of the shard written again later).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rsretrieve.errors import StoreError, located
from rsretrieve.store.checksum import read_readable, row_checksums
from rsretrieve.store.layout import ROW_CHECKSUM, storage_rows

FLUSH_EVERY_S = 60.0


@dataclass
class _Staged:
    span: object  # ChunkSpan
    rows: np.ndarray  # the store row of each encoded patch
    embeddings: np.ndarray
    locations: tuple | None


@dataclass
class _Shard:
    expected: int  # rows of this shard that this run's chunks cover
    arrived: int = 0
    staged: list[_Staged] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)


class ShardWriter:
    """Buffers chunk results per storage shard of `embedding`; writes each shard whole."""

    def __init__(self, store, modality: str, spans: Sequence, flush_every_s: float = FLUSH_EVERY_S):
        self.store, self.modality = store, modality
        self.group = store.zarr_group(modality, "r+")
        self.rows_per_shard = storage_rows(self.group["embedding"])
        self.flush_every_s = flush_every_s
        self._ledger_position = {str(k): i for i, k in enumerate(self.group["chunk_key"][:])}
        self._shards: dict[int, _Shard] = {}
        for span in spans:
            for shard, lo, hi in self._pieces(span):
                self._shards.setdefault(shard, _Shard(0)).expected += hi - lo
        self._waiting_on: dict[str, set[int]] = {}  # chunk key -> shards not yet written
        self._encoded: dict[str, int] = {}  # chunk key -> patches it encoded

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    def _pieces(self, span) -> list[tuple[int, int, int]]:
        """(shard, first row, row after last) of the parts of a chunk's rows in each shard."""
        out, row = [], span.start
        while row < span.stop:
            shard = row // self.rows_per_shard
            end = min(span.stop, (shard + 1) * self.rows_per_shard)
            out.append((shard, row, end))
            row = end
        return out

    def add(self, span, patch_ids: Sequence[str], embeddings: np.ndarray, locations: tuple | None = None) -> None:
        """Take one chunk's result; write the shards it completes."""
        if span.key not in self._ledger_position:
            raise StoreError(located(self.store.path, f"chunk {span.key} is not in the {self.modality} ledger"))
        staged = _Staged(span, self._rows_of(span, patch_ids), np.asarray(embeddings), locations)
        pieces = self._pieces(span)
        self._waiting_on[span.key] = {shard for shard, _, _ in pieces}
        self._encoded[span.key] = len(staged.rows)
        for shard, lo, hi in pieces:
            entry = self._shards.setdefault(shard, _Shard(hi - lo))
            entry.staged.append(staged)
            entry.arrived += hi - lo
            if entry.arrived >= entry.expected:
                self._write(shard)
        stale = [s for s, e in self._shards.items() if e.staged and time.monotonic() - e.since > self.flush_every_s]
        for shard in stale:
            self._write(shard)

    def _rows_of(self, span, patch_ids: Sequence[str]) -> np.ndarray:
        region = {str(p): span.start + i for i, p in enumerate(self.group["patch_id"][span.start : span.stop])}
        rows = []
        for pid in patch_ids:
            if pid not in region:
                raise StoreError(located(self.store.path, f"patch {pid} does not belong to chunk {span.key}"))
            rows.append(region[pid])
        return np.asarray(rows, dtype=np.int64)

    def flush(self) -> None:
        """Write every shard still waiting (a run's end, or its interruption)."""
        for shard in [s for s, e in self._shards.items() if e.staged]:
            self._write(shard)

    # -- one shard --------------------------------------------------------------------------------
    def _write(self, shard: int) -> None:
        entry = self._shards[shard]
        if not entry.staged:
            return
        lo = shard * self.rows_per_shard
        hi = min(lo + self.rows_per_shard, self.group["embedding"].shape[0])
        whole = entry.arrived >= hi - lo  # every row arrives now: nothing on disk to keep
        embedding = self._region("embedding", lo, hi, whole)
        valid = self._region("valid", lo, hi, whole)
        locations = self._locations(lo, hi)
        for staged in entry.staged:
            self._place(staged, lo, hi, embedding, valid, locations)
        self.group["embedding"][lo:hi] = embedding
        if ROW_CHECKSUM in self.group:  # stores made before rows had their own checksum lack it
            self.group[ROW_CHECKSUM][lo:hi] = row_checksums(embedding)
        self.group["valid"][lo:hi] = valid
        if locations is not None:
            self.group["lat"][lo:hi], self.group["lon"][lo:hi] = locations
        # the ledger last: a chunk is done once all of its shards are on disk
        finished = []
        for staged in entry.staged:
            waiting = self._waiting_on[staged.span.key]
            waiting.discard(shard)
            if not waiting:
                finished.append(staged.span.key)
        self._mark_done(finished)
        entry.arrived, entry.expected = 0, max(0, entry.expected - entry.arrived)
        entry.staged, entry.since = [], time.monotonic()

    def _region(self, name: str, lo: int, hi: int, whole: bool) -> np.ndarray:
        array = self.group[name]
        if whole:
            shape = (hi - lo, *array.shape[1:])
            return np.full(shape, np.nan, dtype=array.dtype) if array.dtype.kind == "f" else np.zeros(shape, dtype=array.dtype)
        fill = np.nan if array.dtype.kind == "f" else 0
        return read_readable(array, lo, hi, fill)  # a damaged chunk's rows are all encoded again (`store.repair`)

    def _locations(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The shard's lat/lon, to fill where the plan had none (None: nothing to fill)."""
        if "lat" not in self.group or "lon" not in self.group:
            return None
        lat = np.asarray(self.group["lat"][lo:hi], dtype="float64")
        lon = np.asarray(self.group["lon"][lo:hi], dtype="float64")
        return None if np.isfinite(lat).all() and np.isfinite(lon).all() else (lat, lon)

    @staticmethod
    def _place(staged: _Staged, lo: int, hi: int, embedding, valid, locations) -> None:
        """Put a chunk's rows that lie in [lo, hi) into the shard's arrays; its rows there that were
        not encoded become not valid (a retry may skip what an earlier run encoded)."""
        span = staged.span
        first, last = max(span.start, lo), min(span.stop, hi)
        embedding[first - lo : last - lo] = np.nan
        valid[first - lo : last - lo] = False
        inside = np.flatnonzero((staged.rows >= lo) & (staged.rows < hi))
        local = staged.rows[inside] - lo
        embedding[local] = staged.embeddings[inside]
        valid[local] = True
        if locations is not None and staged.locations is not None:
            for i, row in zip(inside, local):
                la, lo_ = staged.locations[0][i], staged.locations[1][i]
                if la is not None and lo_ is not None:
                    locations[0][row], locations[1][row] = la, lo_

    def _mark_done(self, keys: list[str]) -> None:
        if not keys:
            return
        positions = np.array(sorted(self._ledger_position[k] for k in keys))
        a, b = int(positions[0]), int(positions[-1]) + 1
        done = np.array(self.group["chunk_done"][a:b], dtype=bool)
        done[positions - a] = True
        if "chunk_valid" in self.group:
            counts = np.array(self.group["chunk_valid"][a:b], dtype=np.int64)
            counts[positions - a] = [self._encoded[k] for k in sorted(keys, key=self._ledger_position.get)]
            self.group["chunk_valid"][a:b] = counts
        self.group["chunk_done"][a:b] = done
        for key in keys:
            self._waiting_on.pop(key, None)
            self._encoded.pop(key, None)
