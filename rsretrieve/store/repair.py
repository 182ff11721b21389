"""Repairing a store group from its data: what `verify` names, `encode` mends.

Only the data's own record is trusted. Under the store's lock, before anything else reads the
group (`indexer.pipeline`), every array is read once and its invariants checked
(`integrity.store_damage`), then:

- the ledger's chunk keys and row ranges are written again from the data's chunks (the store keeps
  the data's order); a chunk's done flag or count, from the other of the two, else it is not done;
- coordinates (patch_id, split, labels, lat/lon, ...) are written again from the data's metadata,
  whole files at a time (so zarr never reads a damaged one before writing it);
- embedding and `valid` rows that cannot be read belong to chunks marked not done, which the run
  encodes again (a file whose every chunk is damaged is deleted first); lat/lon rows that no
  metadata gives are found again by the readers of those chunks.

Data other than the store was made from is never written into it: the group's recorded patch
fingerprint must be the data's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.labels import CLASSES
from rsretrieve.store.checksum import Damage, read_readable
from rsretrieve.store.integrity import LEDGER_ARRAYS, ROW_DATA, chunks_of_rows, store_damage
from rsretrieve.store.layout import FLOAT_COORDS, ledger, patch_coords, storage_rows


def repair(store, modality: Modality, data: Callable[[], tuple[object, Sequence, str]]) -> list[str]:
    """Mend every damaged array of a group (see the module); returns notes for the user (none when
    nothing is damaged). `data()` (called only then) gives the data's patch rows in chunk order (a
    table or a lazy one), its chunks' rows in that order, and its patch fingerprint."""
    damage = store_damage(store, modality)
    if not damage:
        return []
    meta, spans, fingerprint = data()
    group_dir = Path(store.path) / modality
    recorded = (store.provenance(modality).get("dataset") or {}).get("patches_sha256")
    if recorded != fingerprint:
        raise StoreError(located(group_dir, f"is damaged ({', '.join(damage)}) and was made from other patches than these, so they "
                                            "cannot repair it: delete it and encode again"))
    group = store.zarr_group(modality, "r+")
    ledger_damage = {name: found for name, found in damage.items() if name in LEDGER_ARRAYS}
    if ledger_damage:
        _rewrite_ledger(group, ledger_damage, spans)
    coordinates = [name for name in damage if name not in LEDGER_ARRAYS and name not in ROW_DATA]
    if coordinates:
        _rewrite_coordinates(group_dir, group, coordinates, meta)
    rows = [d for name, found in damage.items() if name in (*ROW_DATA, *FLOAT_COORDS) for d in found]
    again = list(chunks_of_rows(store, modality, rows))
    store.reset_chunks(modality, again)
    for name in ROW_DATA:
        if name in damage:
            _delete_wholly_damaged(group_dir / name, group[name], damage[name])
    what = ", ".join(f"{name} ({len(found)} part{'s' if len(found) > 1 else ''})" for name, found in sorted(damage.items()))
    rewritten = [*ledger_damage, *coordinates]
    done = [f"{', '.join(rewritten)} written again from the data" if rewritten else "", f"{len(again)} chunk(s) encoded again" if again else ""]
    return [f"repaired the {modality.upper()} store's damaged {what}: {'; '.join(part for part in done if part)}"]


def _rewrite_ledger(group, damage: dict[str, list[Damage]], spans: Sequence) -> None:
    n = int(group["chunk_key"].shape[0])
    if {"chunk_key", "chunk_start", "chunk_stop"} & damage.keys():
        entries = ledger(spans[:n])
        for name in ("chunk_start", "chunk_stop", "chunk_key"):
            values = entries[name][1]
            group[name][:] = np.array([str(v) for v in values], dtype=group[name].dtype) if name == "chunk_key" else values
    lost_done = _rows_mask(damage.get("chunk_done", []), n)
    lost_count = _rows_mask(damage.get("chunk_valid", []), n)
    if not (lost_done.any() or lost_count.any()):
        return
    done = read_readable(group["chunk_done"], 0, n, False).astype(bool)
    counts = read_readable(group["chunk_valid"], 0, n, -1).astype(np.int64) if "chunk_valid" in group else None
    # each says the other: a count is written just before its done flag (`store.writer`)
    done[lost_done] = counts[lost_done] >= 0 if counts is not None else False
    if counts is not None:
        done[lost_done & lost_count] = False
        counts[lost_count] = -1
        counts[lost_count & done] = _encoded_counts(group, lost_count & done)
        group["chunk_valid"][:] = counts
    group["chunk_done"][:] = done


def _encoded_counts(group, which: np.ndarray) -> np.ndarray:
    """Patches marked valid in each chunk of `which` (its count when it was marked done)."""
    starts, stops = np.asarray(group["chunk_start"][:]), np.asarray(group["chunk_stop"][:])
    valid = np.concatenate([[0], np.cumsum(np.asarray(group["valid"][:], dtype=bool), dtype=np.int64)])
    return (valid[stops] - valid[starts])[which]


def _rewrite_coordinates(group_dir: Path, group, names: list[str], meta) -> None:
    """Write coordinates again from the data's metadata, a whole file at a time."""
    import xarray as xr

    if "label" in names:
        group["label"][:] = np.array(CLASSES, dtype=group["label"].dtype)
    per_patch = [name for name in names if name != "label"]
    if not per_patch:
        return
    for name in per_patch:  # written whole: zarr (a shard's index) and xarray (times) would read the damaged files first
        for path in [p for p in (group_dir / name).rglob("*") if p.is_file() and p.name != "zarr.json"]:
            path.unlink()
    n = int(group[per_patch[0]].shape[0])
    step = min(storage_rows(group[name]) for name in per_patch)
    for start in range(0, n, step):
        length = min(step, n - start)
        coords = {name: value for name, value in patch_coords(meta.slice(start, length)).items() if name in per_patch}
        missing = [name for name in per_patch if name not in coords and name not in FLOAT_COORDS]
        if missing:
            raise StoreError(located(group_dir, f"its {', '.join(missing)} cannot be written again: the data's metadata lacks "
                                                "them; delete the store and encode again"))
        for name in FLOAT_COORDS:  # not in the metadata: the readers find them again
            if name in per_patch and name not in coords:
                group[name][start:start + length] = np.nan
        if coords:
            xr.Dataset(coords=coords).to_zarr(group_dir.parent, group=group_dir.name, region={"patch": slice(start, start + length)},
                                              mode="r+", zarr_format=3, consolidated=False)


def _delete_wholly_damaged(array_dir: Path, array, damage: list[Damage]) -> None:
    """Delete the files of an array none of whose rows can be read (a cut shard index): zarr reads
    a shard's index before writing part of it."""
    per_file = storage_rows(array)
    bad = _rows_mask(damage, int(array.shape[0]))
    for start in range(0, bad.size, per_file):
        if bad[start:start + per_file].all():
            key = array.metadata.chunk_key_encoding.encode_chunk_key((start // per_file,) + (0,) * (array.ndim - 1))
            (array_dir / key).unlink(missing_ok=True)


def _rows_mask(damage: list[Damage], n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    for d in damage:
        mask[d.rows[0]:d.rows[1]] = True
    return mask
