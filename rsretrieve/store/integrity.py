"""Does a store's ledger agree with its data? What `rsretrieve verify` checks, and `encode` repairs.

The ledger says which chunks are done and how many patches each encoded (`chunk_valid`). The data
can disagree when files are lost or damaged outside rsretrieve (a partial copy, a full disk, a
hand-deleted file). Two depths of checking:

- `damaged_chunks` (cheap: one read of `valid`, a listing of the embedding's chunk files and the
  index at the end of each shard), run by `info`, `encode` and `index`: done chunks whose valid
  count differs from the ledger's, or whose encoded rows lie in embedding chunk files that are
  gone or whose index is cut or fails its checksum (a truncated copy).
- `verify` (reads every embedding once): also the metadata files of every array, and rows marked
  valid whose embeddings are not finite.

A damaged chunk is repaired by encoding it again (`EmbeddingStore.reset_chunks`, then `encode`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError
from rsretrieve.store.layout import storage_rows

# the arrays every store group needs (coordinates besides patch_id are optional)
REQUIRED_ARRAYS = ("embedding", "valid", "patch_id", "chunk_key", "chunk_start", "chunk_stop", "chunk_done")


@dataclass(frozen=True)
class Finding:
    """One thing wrong with a store: where (a path), what, and what to do about it."""

    where: str
    problem: str
    remedy: str
    chunks: tuple[str, ...] = ()  # the damaged chunks `encode` re-encodes

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}; {self.remedy}"


def damaged_chunks(store, modality: Modality) -> dict[str, str]:
    """{chunk key: what is wrong} for done chunks whose data disagrees with the ledger (cheap)."""
    group = store.zarr_group(modality)
    try:
        spans, done = store.ledger(modality)
        valid = np.asarray(group["valid"][:], dtype=bool)
        embedding = group["embedding"]
    except Exception as exc:  # noqa: BLE001 — a missing zarr.json, a truncated or corrupt chunk file (zstd, crc)
        raise StoreError(f"{store.path / modality}: unreadable array ({_short(exc)}); run `rsretrieve verify`") from None
    counts = store.chunk_valid(modality)
    rows_per_file = storage_rows(embedding)
    present = stored_chunk_rows(Path(store.path) / modality / "embedding", embedding)
    starts = np.array([span.start for span in spans], dtype=np.int64)
    stops = np.array([span.stop for span in spans], dtype=np.int64)
    marked = _per_chunk_sums(valid, starts, stops)  # vectorised: a ledger of 10^6 chunks takes no loop
    lost_count = done & (counts >= 0) & (marked != counts) if counts is not None else np.zeros_like(done)
    # rows marked valid whose embedding file is gone
    missing_files = np.setdiff1d(np.arange(-(-valid.size // rows_per_file)), np.fromiter(present, np.int64, len(present)))
    lost_rows = valid & np.isin(np.arange(valid.size) // rows_per_file, missing_files) if missing_files.size else np.zeros_like(valid)
    lost_file = done & ~lost_count & (_per_chunk_sums(lost_rows, starts, stops) > 0)
    # rows marked valid in shard files whose index is cut or fails its checksum
    broken = broken_shards(Path(store.path) / modality, present)
    broken_rows = valid & np.isin(np.arange(valid.size) // rows_per_file, list(broken)) if broken else np.zeros_like(valid)
    broken_file = done & ~lost_count & ~lost_file & (_per_chunk_sums(broken_rows, starts, stops) > 0)
    damaged: dict[str, str] = {}
    for i in np.flatnonzero(lost_count | lost_file | broken_file):
        span = spans[i]
        if lost_count[i]:
            damaged[span.key] = f"{counts[i]} patches were encoded, {int(marked[i])} are marked valid (lost `valid` data)"
        elif lost_file[i]:
            damaged[span.key] = f"embedding chunk file(s) of rows {span.start}-{span.stop - 1} are missing"
        else:
            damaged[span.key] = broken[int(span.start // rows_per_file)]
    return damaged


def broken_shards(group_dir: Path, present: set[int]) -> dict[int, str]:
    """{shard number: what is wrong} for the embedding shard files whose index is cut or fails its
    checksum (each read from its end only: a few KB a file)."""
    from rsretrieve.store.rows import RowReader

    reader = RowReader(group_dir)
    problems = {shard: reader.shard_problem(shard) for shard in sorted(present)}
    return {shard: why for shard, why in problems.items() if why}


def discard_broken_shards(store, modality: Modality) -> list[int]:
    """Delete the embedding shard files whose index is cut or fails its checksum (their chunks
    marked not done first: `reset_chunks`); returns their numbers. Zarr reads a shard before
    writing part of it, so a broken one would stop the repair; deleted, it is written anew from
    the re-encoded rows."""
    group_dir = Path(store.path) / modality
    array = store.zarr_group(modality)["embedding"]
    broken = broken_shards(group_dir, stored_chunk_rows(group_dir / "embedding", array))
    for shard in broken:
        (group_dir / "embedding" / array.metadata.chunk_key_encoding.encode_chunk_key((shard, 0))).unlink(missing_ok=True)
    return sorted(broken)


def chunks_with_skips(store, modality: Modality) -> list[str]:
    """Done chunks in which some patch is not valid (skipped: unreadable, or a gap in the data)."""
    spans, done = store.ledger(modality)
    valid = np.asarray(store.zarr_group(modality)["valid"][:], dtype=bool)
    starts = np.array([span.start for span in spans], dtype=np.int64)
    stops = np.array([span.stop for span in spans], dtype=np.int64)
    short = _per_chunk_sums(valid, starts, stops) < stops - starts
    return [spans[i].key for i in np.flatnonzero(done & short)]


def _per_chunk_sums(flags: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Per chunk [start, stop): the number of true flags in its rows."""
    cumulative = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    return cumulative[stops] - cumulative[starts]


def stored_chunk_rows(array_dir: Path, array) -> set[int]:
    """Numbers of the row files (shards, or chunks of an unsharded array) of a 2-D (rows, dim) array
    that exist on disk (one listing)."""
    encoding = array.metadata.chunk_key_encoding
    files = {p.relative_to(array_dir).as_posix() for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"}
    n_chunks = -(-array.shape[0] // storage_rows(array)) if array.shape[0] else 0
    return {i for i in range(n_chunks) if encoding.encode_chunk_key((i, 0)) in files}


def verify(store) -> list[Finding]:
    """Everything wrong with a store, each a `Finding` naming the file or chunks and the remedy."""
    path = Path(store.path)
    root_meta = _metadata_problem(path / "zarr.json")
    if root_meta:
        return [Finding(str(path / "zarr.json"), root_meta, "the store's root metadata is lost; delete the store and encode again")]
    findings: list[Finding] = []
    for modality in store.modalities():
        findings += verify_group(store, modality)
    return findings


def verify_group(store, modality: Modality) -> list[Finding]:
    group_dir = Path(store.path) / modality
    rebuild = f"delete {group_dir} and run `rsretrieve encode --modality {modality}`"
    for name in ("zarr.json", *(f"{a}/zarr.json" for a in REQUIRED_ARRAYS)):
        problem = _metadata_problem(group_dir / name)
        if problem:
            return [Finding(str(group_dir / name), problem, rebuild)]
    try:
        damaged = damaged_chunks(store, modality)
        damaged.update(_non_finite_chunks(store, modality, exclude=damaged))
    except StoreError as exc:
        return [Finding(str(group_dir), str(exc), rebuild)]
    if not damaged:
        return []
    examples = "; ".join(f"{key}: {why}" for key, why in list(damaged.items())[:3])
    return [Finding(str(group_dir), f"{len(damaged)} chunk(s) marked done disagree with the data ({examples})",
                    f"run `rsretrieve encode --modality {modality}` to encode them again", tuple(damaged))]


def _non_finite_chunks(store, modality: Modality, exclude: dict) -> dict[str, str]:
    """Done chunks with a row marked valid whose embedding is not finite (reads every embedding)."""
    group = store.zarr_group(modality)
    spans, done = store.ledger(modality)
    embedding, valid = group["embedding"], group["valid"]
    found = {}
    for span, is_done in zip(spans, done):
        if not is_done or span.key in exclude or span.stop == span.start:
            continue
        try:
            marked = np.asarray(valid[span.start : span.stop], dtype=bool)
            block = np.asarray(embedding[span.start : span.stop])[marked]
        except Exception as exc:  # noqa: BLE001 — a corrupt chunk file is damage to this chunk, not a crash
            found[span.key] = f"unreadable data ({_short(exc)})"
            continue
        bad = int((~np.isfinite(block).all(axis=1)).sum()) if block.size else 0
        if bad:
            found[span.key] = f"{bad} row(s) marked valid are not finite"
    return found


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:160]


def _metadata_problem(path: Path) -> str | None:
    """Why a zarr.json cannot serve (missing, not JSON, not a zarr node), or None."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return "metadata file is missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"metadata is unreadable ({' '.join(str(exc).split())[:120]})"
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") not in ("group", "array"):
        return "metadata is not a Zarr v3 node"
    return None
