"""Does a store's ledger agree with its data? What `rsretrieve verify` checks, and `encode` repairs.

The ledger says which chunks are done and how many patches each encoded (`chunk_valid`). The data
can disagree when files are lost or damaged outside rsretrieve (a partial copy, a full disk, a
hand-deleted file). Two depths of checking:

- `damaged_chunks` (cheap: one read of `valid`, a listing of the embedding's chunk files and the
  index at the end of each shard), run by `info`, `encode` and `index`: done chunks whose valid
  count differs from the ledger's, or whose encoded rows lie in embedding chunk files that are
  gone or whose index is cut or fails its checksum (a truncated copy).
- `verify` (reads every array once): also the metadata files of every array, every chunk's
  checksum and every file the store wrote (`store.checksum`), the ledger's own consistency, unique
  patch ids, and rows marked valid whose embeddings are not finite.

`encode` repairs all of it (`store.repair`): damaged embedding rows are encoded again
(`EmbeddingStore.reset_chunks`), coordinates and the ledger are written again from the data.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.store.checksum import ChecksumError, Damage, checksummed, scan
from rsretrieve.store.layout import ROW_CHECKSUM, storage_rows

# the arrays every store group needs (coordinates besides patch_id are optional)
REQUIRED_ARRAYS = ("embedding", "valid", "patch_id", "chunk_key", "chunk_start", "chunk_stop", "chunk_done")
ROW_DATA = ("embedding", "valid", "embedding_crc")  # written shard by shard as encoding goes: the ledger says which must exist
LEDGER_ARRAYS = ("chunk_key", "chunk_start", "chunk_stop", "chunk_done", "chunk_valid")


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
    # rows marked valid whose embedding file (or row checksum file) is gone
    lost_rows = valid & _rows_without_file(present, rows_per_file, valid.size)
    lost_array = "embedding"
    if ROW_CHECKSUM in group and not lost_rows.any():
        checksums = group[ROW_CHECKSUM]
        lost_array, lost_rows = ROW_CHECKSUM, valid & _rows_without_file(
            stored_chunk_rows(Path(store.path) / modality / ROW_CHECKSUM, checksums), storage_rows(checksums), valid.size)
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
            damaged[span.key] = f"{lost_array} chunk file(s) of rows {span.start}-{span.stop - 1} are missing"
        else:
            damaged[span.key] = broken[int(span.start // rows_per_file)]
    return damaged


def _rows_without_file(present: set[int], rows_per_file: int, n_rows: int) -> np.ndarray:
    missing = np.setdiff1d(np.arange(-(-n_rows // rows_per_file)), np.fromiter(present, np.int64, len(present)))
    return np.isin(np.arange(n_rows) // rows_per_file, missing) if missing.size else np.zeros(n_rows, bool)


def broken_shards(group_dir: Path, present: set[int]) -> dict[int, str]:
    """{shard number: what is wrong} for the embedding shard files whose index is cut or fails its
    checksum (each read from its end only: a few KB a file)."""
    from rsretrieve.store.rows import RowReader

    reader = RowReader(group_dir)
    problems = {shard: reader.shard_problem(shard) for shard in sorted(present)}
    return {shard: why for shard, why in problems.items() if why}


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
    """Numbers of the row files (shards, or chunks of an unsharded array) of an array whose files
    hold whole rows that exist on disk (one listing)."""
    encoding = array.metadata.chunk_key_encoding
    files = {p.relative_to(array_dir).as_posix() for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"}
    n_chunks = -(-array.shape[0] // storage_rows(array)) if array.shape[0] else 0
    return {i for i in range(n_chunks) if encoding.encode_chunk_key((i,) + (0,) * (array.ndim - 1)) in files}


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
    repair = f"run `rsretrieve encode --modality {modality}` to repair it"
    damage = store_damage(store, modality)
    ledger_sound = not damage.keys() & {"valid", *LEDGER_ARRAYS}  # else the checks below cannot read it
    findings = [Finding(str(group_dir / name), "; ".join(map(str, found[:3])) + (f" (and {len(found) - 3} more)" if len(found) > 3 else ""),
                        repair, chunks_of_rows(store, modality, found) if name in ROW_DATA and ledger_sound else ())
                for name, found in damage.items()]
    if not ledger_sound:
        return findings
    try:
        damaged = damaged_chunks(store, modality)
    except StoreError as exc:
        return [*findings, Finding(str(group_dir), str(exc), rebuild)]
    if not damaged:
        return findings
    examples = "; ".join(f"{key}: {why}" for key, why in list(damaged.items())[:3])
    return [*findings, Finding(str(group_dir), f"{len(damaged)} chunk(s) marked done disagree with the data ({examples})",
                               f"run `rsretrieve encode --modality {modality}` to encode them again", tuple(damaged))]


def array_damage(store, modality: Modality) -> dict[str, list[Damage]]:
    """{array name: its damaged rows} over every array of a group, each read once: chunks that fail
    their checksum or do not decode, and lost files of the arrays whose files are all written at
    once (coordinates, ledger)."""
    group_dir = Path(store.path) / modality
    found = {}
    arrays = dict(store.zarr_group(modality).arrays())
    for name, array in sorted(arrays.items()):
        if name != "embedding":
            found[name] = scan(array, group_dir / name, expect_files=checksummed(array) and name not in ROW_DATA)
    valid = np.asarray(arrays["valid"][:], dtype=bool) if not found["valid"] else None
    found["embedding"] = scan(arrays["embedding"], group_dir / "embedding", expect_files=False, wrong_rows=None if valid is None else (
        lambda start, rows: start + np.flatnonzero(valid[start:start + len(rows)] & ~np.isfinite(rows).all(axis=1))))  # valid: finite
    return {name: damage for name, damage in found.items() if damage}


@contextmanager
def naming_damage(store_path: str | Path):
    """A checksum failure inside the block (zarr knows no file names) raised again naming the
    array and rows of a store: the small arrays are read first, the embeddings last."""
    try:
        yield
    except ChecksumError as exc:
        if not str(exc).startswith("a stored chunk"):
            raise  # already names its file
        raise ChecksumError(_first_damage(Path(store_path)) or str(exc)) from None


def _first_damage(path: Path) -> str | None:
    import zarr

    for group_dir in sorted(p.parent.parent for p in path.glob("*/embedding/zarr.json")):
        group = zarr.open_group(group_dir, mode="r", zarr_format=3)
        for name, array in sorted(group.arrays(), key=lambda item: item[0] == "embedding"):
            found = scan(array, group_dir / name, expect_files=False)
            if found:
                return located(group_dir / name, f"{found[0]}; the store cannot answer from damaged data: run `rsretrieve verify`, then "
                                                 f"`rsretrieve encode --modality {group_dir.name}` to repair it")
    return None


def chunks_of_rows(store, modality: Modality, damage: list[Damage]) -> tuple[str, ...]:
    """The ledger's chunks that own any of the damaged rows."""
    spans, _ = store.ledger(modality)
    return tuple(span.key for span in spans if any(span.start < stop and start < span.stop for start, stop in (d.rows for d in damage)))


def store_damage(store, modality: Modality) -> dict[str, list[Damage]]:
    """{array: rows} of everything `encode` repairs: damaged arrays (`array_damage`) and, where
    the arrays they need are readable, broken invariants (`invariant_damage`)."""
    damage = array_damage(store, modality)
    if not damage.keys() & {"valid", "patch_id", *LEDGER_ARRAYS}:
        damage.update(invariant_damage(store, modality))
    return damage


def invariant_damage(store, modality: Modality) -> dict[str, list[Damage]]:
    """{array: rows} of a readable group's broken invariants: ledger chunks that do not tile the
    rows in order or repeat a key, chunks marked done without their count, repeated or empty ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    group = store.zarr_group(modality)
    spans, done = store.ledger(modality)
    n_rows, n_chunks = int(group["valid"].shape[0]), len(spans)
    starts = np.array([span.start for span in spans], dtype=np.int64)
    stops = np.array([span.stop for span in spans], dtype=np.int64)
    found: dict[str, list[Damage]] = {}
    if spans and (starts[0] != 0 or stops[-1] != n_rows or (starts[1:] != stops[:-1]).any() or (stops < starts).any()):
        found["chunk_start"] = [Damage((0, n_chunks), f"do not cover rows 0-{n_rows - 1} in order")]
    if len({span.key for span in spans}) != n_chunks or any(not span.key for span in spans):
        found["chunk_key"] = [Damage((0, n_chunks), "repeat a chunk key or hold an empty one")]
    counts = store.chunk_valid(modality)
    uncounted = np.flatnonzero(done & (counts[:n_chunks] < 0)) if counts is not None else []
    if len(uncounted):
        found["chunk_valid"] = [Damage((int(i), int(i) + 1), "are marked done without their count of encoded patches") for i in uncounted]
    ids = pa.array(np.asarray(group["patch_id"][:]).astype(object), pa.string())
    counted = pc.value_counts(ids)
    repeated = counted.filter(pc.greater(counted.field("counts"), 1))
    if len(repeated) or pc.any(pc.equal(ids, "")).as_py():
        first = f"{len(repeated)} repeated, first {repeated[0]['values'].as_py()!r}" if len(repeated) else "one is empty"
        found["patch_id"] = [Damage((0, n_rows), f"are not unique ids ({first})")]
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
