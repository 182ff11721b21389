"""The embedding store: Zarr v3 written through xarray, one group per modality.

Each group is a self-describing Dataset that opens with plain `xarray.open_zarr(path, group="s2")`,
and the whole store as `xarray.open_datatree(path, engine="zarr")` (children `s1`, `s2`):

    embedding (patch, dim)    float32 (or float16); NaN until encoded, and for skipped patches;
              not L2-normalised (attrs["normalised"] = False): normalise rows for cosine similarity
    valid     (patch)         bool: encoded and usable
    coords    patch_id, pair_id, split, country, labels (patch, label) bool, label, lat, lon,
              grid_cell, timestamp, product_id (those the source has)
    coords    chunk_key / chunk_start / chunk_stop / chunk_done / chunk_valid (chunk)   the
              resumability ledger; chunk_valid: patches a done chunk encoded, to notice lost files
              (`store.integrity`); embedding_crc (patch): each row's CRC32C. Coordinates, so that
              `data_vars` is the data alone; on disk plain arrays (read and written with zarr)
    attrs     provenance: model, config, checkpoint_sha256 ("random-init" for untrained weights),
              preprocessing (band order, statistics, resampling), rsretrieve version, creation time,
              and the data it was made from (dataset, root, subset, options, a fingerprint of its
              patch list): a store serves that data and refuses any other
    root attrs  store_id: made once, when the store is created; indexes belong to it

Rows are allocated for every patch up front, in the dataset's chunk order, so each data chunk owns
one fixed region. A chunk is written (embedding + valid) and only then marked done in the ledger;
writing a region twice is harmless, so a crash between the two costs one chunk's recomputation and
never a duplicate or a hole. Every chunk of every array ends with a CRC32C (`store.checksum`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import xarray as xr
import zarr

from rsretrieve.bands import MODALITIES, Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.provenance import (MODEL_KEYS, dataset_differences, describe, describe_dataset, differences, is_random_init,
                                   upsampling_differences)
from rsretrieve.store.grow import GROWTH_KEYS, extend_ledger, resize_and_fill
from rsretrieve.store import layout
from rsretrieve.store.layout import NOT_NORMALISED, ChunkSpan, skeleton
from rsretrieve.store.read import PatchIndexes, ledger_as_coords



class EmbeddingStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._chunk_indexes: dict[str, dict[str, int]] = {}
        self._patch_indexes = PatchIndexes()

    # -- reading ---------------------------------------------------------------------------------
    def has(self, modality: Modality) -> bool:
        return (self.path / modality / "zarr.json").exists()

    def modalities(self) -> list[Modality]:
        return [m for m in MODALITIES if self.has(m)]

    def open(self, modality: Modality, index: bool = True) -> xr.Dataset:
        """The group as a Dataset: `embedding` and `valid` its data, the ledger among its
        coordinates, `patch_id` an index (`ds.sel(patch_id=...)`). The index reads every id (about
        6 s and 1.5 GB at 10^7 rows); `index=False` leaves it out, for reads by row."""
        ds = ledger_as_coords(self._open_group(modality))
        return self._patch_indexes.apply(self.path / modality, ds) if index else ds

    def open_tree(self) -> xr.DataTree:
        """The whole store as a DataTree (children `s1`, `s2`), each child as `open` gives it.
        (DataTree.sel knows no `patch_id`: select on a child's `.dataset`.)"""
        modalities = self.modalities()
        if not modalities:
            raise StoreError(located(self.path, "has no embeddings yet; run `rsretrieve encode`"))
        # a crash between creating a group and consolidating leaves the root's listing without it
        consolidated = not any(self.needs_consolidation(m) for m in modalities)
        try:
            tree = xr.open_datatree(self.path, engine="zarr", consolidated=consolidated)
        except (KeyError, ValueError, OSError) as exc:
            raise StoreError(located(self.path, f"unreadable store ({_short(exc)}); run `rsretrieve verify`")) from None
        for modality in modalities:
            child = ledger_as_coords(tree[modality].to_dataset(inherit=False))
            tree[modality].dataset = self._patch_indexes.apply(self.path / modality, child)
        return tree

    def _open_group(self, modality: Modality) -> xr.Dataset:
        if not self.has(modality):
            raise StoreError(located(self.path, f"has no {modality.upper()} embeddings yet; run `rsretrieve index --modality {modality}`"))
        try:
            return xr.open_zarr(self.path, group=modality, consolidated=True)
        except (KeyError, ValueError):  # created, but consolidation did not happen: read plainly
            pass
        try:
            return xr.open_zarr(self.path, group=modality, consolidated=False)
        except (KeyError, ValueError, OSError) as exc:
            raise StoreError(located(self.path / modality, f"unreadable store group ({_short(exc)}); run `rsretrieve verify`")) from None

    @property
    def store_id(self) -> str:
        """The store's identity, made when it was created (indexes belong to it); a store without
        one (none yet, or written by an older rsretrieve) is identified by its resolved path."""
        try:
            found = zarr.open_group(self.path, mode="r", zarr_format=3).attrs.get("store_id")
        except Exception:  # noqa: BLE001 — no store yet, or damaged root metadata: `verify` names it
            found = None
        return str(found) if found else "path-" + hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:12]

    def provenance(self, modality: Modality) -> dict:
        return dict(self._group(modality, "r").attrs["provenance"])

    def ledger(self, modality: Modality) -> tuple[list[ChunkSpan], np.ndarray]:
        group = self._group(modality, "r")
        try:
            keys = [str(k) for k in group["chunk_key"][:]]
            starts, stops = group["chunk_start"][:], group["chunk_stop"][:]
        except KeyError as exc:
            raise StoreError(located(self.path / modality, f"not an rsretrieve store group (no {exc}); delete it or use another --store")) from None
        spans = [ChunkSpan(k, int(a), int(b)) for k, a, b in zip(keys, starts, stops)]
        return spans, np.asarray(group["chunk_done"][: len(spans)], dtype=bool)  # keys are written last when growing

    def chunk_valid(self, modality: Modality) -> np.ndarray | None:
        """Per chunk, the patches it encoded when it was marked done (-1: not done); None for a store
        written before the ledger kept them."""
        group = self._group(modality, "r")
        return np.asarray(group["chunk_valid"][: group["chunk_key"].shape[0]], dtype=np.int64) if "chunk_valid" in group else None

    def done_chunks(self, modality: Modality) -> set[str]:
        spans, done = self.ledger(modality)
        return {span.key for span, flag in zip(spans, done) if flag}

    def valid_count(self, modality: Modality) -> int:
        """Patches of a modality with an embedding."""
        return int(np.count_nonzero(self._group(modality, "r")["valid"][:]))

    def skipped(self, modality: Modality) -> dict:
        """What encoding runs skipped: {"count", "by_reason", "examples"} ({} if nothing)."""
        return dict(self._group(modality, "r").attrs.get("skipped", {}))

    def record_skipped(self, modality: Modality, by_reason: dict[str, int], examples: list[str],
                       retry: dict[str, dict[str, int]] | None = None) -> None:
        """Add a run's skipped patches (counted by reason) to the group's attributes; `retry`: the
        chunks the next run reads again by itself (the way to the data failed), with their counts."""
        group = self._group(modality, "r+")
        recorded = dict(group.attrs.get("skipped", {}))
        reasons = dict(recorded.get("by_reason", {}))
        for reason, n in by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
        retry = {**recorded.get("retry", {}), **(retry or {})}
        group.attrs["skipped"] = {"count": sum(reasons.values()), "by_reason": reasons,
                                  "examples": (list(recorded.get("examples", [])) + list(examples))[:5], **({"retry": retry} if retry else {})}
        _consolidate(self.path)

    def take_retry(self, modality: Modality) -> list[str]:
        """The chunks whose patches could not be reached (`record_skipped`'s `retry`), their skips
        taken out of the record: the run about to read them again records what still fails."""
        group = self._group(modality, "r+")
        recorded = dict(group.attrs.get("skipped", {}))
        retry = recorded.pop("retry", {})
        if not retry:
            return []
        reasons = dict(recorded.get("by_reason", {}))
        for counts in retry.values():
            for reason, n in counts.items():
                reasons[reason] = reasons.get(reason, 0) - int(n)
        reasons = {reason: n for reason, n in reasons.items() if n > 0}
        group.attrs["skipped"] = {**recorded, "by_reason": reasons, "count": sum(reasons.values())}
        _consolidate(self.path)
        return list(retry)

    def summary(self) -> dict:
        """Counts per modality, for `rsretrieve info`."""
        from rsretrieve.store.integrity import damaged_chunks

        out: dict = {"path": str(self.path), "modalities": {}}
        for modality in self.modalities():
            try:
                out["modalities"][modality] = self._summary(modality, damaged_chunks(self, modality))
            except StoreError as exc:
                out["modalities"][modality] = {"error": str(exc)}
        return out

    def _summary(self, modality: Modality, damaged: dict) -> dict:
        group = self._group(modality, "r")
        spans, done = self.ledger(modality)
        valid = np.asarray(group["valid"][:], dtype=bool)
        prov = dict(group.attrs["provenance"])
        return {
            "patches": int(valid.size),
            "encoded": int(valid.sum()),
            "chunks_done": int(done.sum()),
            "chunks": len(spans),
            "complete": bool(done.all()) and not damaged,
            "damaged_chunks": len(damaged),
            "model": prov.get("model"),
            "checkpoint_sha256": prov.get("checkpoint_sha256"),
            "random_init": is_random_init(prov),
            "source": prov.get("source") or {},
            "preprocessing": prov.get("preprocessing") or {},
            "dataset": prov.get("dataset") or {},
            "skipped": int(dict(group.attrs.get("skipped", {})).get("count", 0)),
        }

    # -- writing ---------------------------------------------------------------------------------
    def check(self, modality: Modality, provenance: dict, spans: Sequence[ChunkSpan], dtype: str | None = None,
              held_sha256: str | None = None) -> str:
        """Check that an existing group takes these embeddings; returns the group's dtype.

        Another model, checkpoint, preprocessing or (an explicitly asked) dtype is refused:
        embeddings of different models are never mixed. Other data is refused too, except data that
        grew: `spans` may go on past the ledger when `held_sha256` (the fingerprint of the data's
        chunks that the group already holds) is the one the group recorded (`store.grow`)."""
        existing = self.provenance(modality)
        asked = {**provenance, "dtype": dtype or existing.get("dtype")}
        diff = differences(existing, asked)
        if diff == ["dtype"]:
            raise StoreError(located(self.path, f"holds {modality.upper()} embeddings as {existing.get('dtype')}, not {dtype}: a store keeps "
                                                "the dtype it was created with — leave out --float16/--float32, or use another --store"))
        if diff:
            raise StoreError(
                located(
                    self.path,
                    f"holds {modality.upper()} embeddings of {describe(existing)} ({existing.get('dtype')}), not of "
                    f"{describe(asked)} ({asked.get('dtype')}): they differ in {', '.join(diff)}; embeddings of "
                    "different models are never mixed — use another --store or delete this one",
                )
            )
        if upsampling_differences(existing, provenance):
            method = (provenance.get("preprocessing") or {}).get("upsample")
            raise StoreError(located(self.path, f"its {modality.upper()} embeddings had the 20 m bands of odd Major TOM windows nearest-upsampled "
                                                f"by the reader (an older rsretrieve), this model upsamples them {method}: "
                                                "use another --store or delete this one"))
        made_from, asked_from = existing.get("dataset"), provenance.get("dataset")
        diff = [key for key in dataset_differences(made_from, asked_from) if not (key == "root" and _moved(made_from, asked_from))]
        grown = set(diff) <= GROWTH_KEYS and held_sha256 is not None and held_sha256 == (made_from or {}).get("patches_sha256")
        if asked_from is not None and diff and not grown:
            raise StoreError(
                located(
                    self.path,
                    f"its {modality.upper()} embeddings were made from {describe_dataset(made_from)}, not from "
                    f"{describe_dataset(asked_from)} (they differ in {', '.join(diff)}); a store serves the data it was "
                    "made from — use another --store or delete this one",
                )
            )
        stored, _ = self.ledger(modality)
        if list(stored) != list(spans[: len(stored)]) or (len(spans) > len(stored) and held_sha256 is None):
            raise StoreError(
                located(self.path, f"was created for a different set or chunking of {modality.upper()} patches; use another --store")
            )
        return str(existing.get("dtype"))

    def moved_root(self, modality: Modality, provenance: dict) -> str | None:
        """The root a group was made from, when `provenance` reads the same patches from another
        one (the data moved: equal fingerprint, another path); else None."""
        made_from, asked_from = self.provenance(modality).get("dataset") or {}, provenance.get("dataset") or {}
        moved = made_from.get("root") != asked_from.get("root") and _moved(made_from, asked_from)
        return made_from.get("root") if moved else None

    def record_root(self, modality: Modality, root: str | None) -> None:
        """Record the data's new root in a group's provenance (the same patches, moved)."""
        group = self._group(modality, "r+")
        provenance = dict(group.attrs["provenance"])
        group.attrs["provenance"] = {**provenance, "dataset": {**(provenance.get("dataset") or {}), "root": root}}
        _consolidate(self.path)

    def grow(self, modality: Modality, spans: Sequence[ChunkSpan], meta: pa.Table, provenance: dict) -> None:
        """Append the chunks `spans` lists past the ledger (their metadata `meta`), recording the
        grown data in the group's provenance (`rsretrieve.store.grow`)."""
        group = self._group(modality, "r+")
        stored, _ = self.ledger(modality)
        resize_and_fill(self.path / modality, group, spans, meta, stored[-1].stop if stored else 0)
        group.attrs["provenance"] = {**dict(group.attrs["provenance"]), "dataset": provenance["dataset"]}
        extend_ledger(group, spans)  # last: the ledger says which rows exist
        _consolidate(self.path)
        self._chunk_indexes.pop(modality, None)
        self._patch_indexes.forget(self.path / modality)

    def needs_consolidation(self, modality: Modality) -> bool:
        """Whether the root's consolidated metadata lacks the group (a crash came between creating
        the group and consolidating): plain xarray opens then fail until it is consolidated."""
        try:
            consolidated = json.loads((self.path / "zarr.json").read_text()).get("consolidated_metadata") or {}
        except (OSError, ValueError, AttributeError):
            return True
        return f"{modality}/embedding" not in (consolidated.get("metadata") or {})

    def consolidate_if_needed(self, modality: Modality) -> None:
        """Consolidate the store's metadata if the group is missing from it; otherwise write nothing."""
        if self.needs_consolidation(modality):
            _consolidate(self.path)

    def reset_chunks(self, modality: Modality, keys) -> None:
        """Mark chunks not done, so that the next encode writes them again (damaged, or retried)."""
        keys = set(keys)
        if not keys:
            return
        group = self._group(modality, "r+")
        spans, done = self.ledger(modality)
        for i, span in enumerate(spans):
            if span.key in keys:
                done[i] = False
        group["chunk_done"][:] = done

    def clear_skipped(self, modality: Modality) -> None:
        """Forget the recorded skips (their chunks are about to be read again)."""
        group = self._group(modality, "r+")
        if "skipped" in group.attrs:
            del group.attrs["skipped"]
            _consolidate(self.path)

    def create(self, modality: Modality, meta, spans: Sequence[ChunkSpan], dim: int, provenance: dict, dtype: str = "float32") -> None:
        """Allocate the group for these patches. `meta`: one row per patch, a `pa.Table` or a lazy
        table with `num_rows` and `slice(offset, length)` (a reader's `patch_rows`).

        The group is written beside the store and renamed into it when complete, so a crash
        while creating it leaves nothing half-made in the store. Coordinates are written in slabs
        of `layout.SLAB_ROWS` (as Python objects only a slab at a time): the first slab creates the
        group, the others are appended as a grown archive's chunks are."""
        self._check_sibling(modality, provenance)
        first = slab_end(spans, 0)
        dataset, encoding = skeleton(meta.slice(0, spans[first - 1].stop if spans else 0), spans[:first], dim, dtype,
                                     total_rows=meta.num_rows, total_chunks=len(spans))
        dataset.attrs["provenance"] = {
            **provenance,
            "dtype": dtype,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        dataset.attrs["description"] = (f"{provenance.get('model', 'model')} embeddings of {modality.upper()} patches (rsretrieve); "
                                        f"{NOT_NORMALISED}")
        staging = self.path.parent / f".{self.path.name}.{modality}.{uuid.uuid4().hex[:8]}.partial"
        try:
            dataset.to_zarr(staging, group=modality, mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding)
            _append_slabs(staging / modality, spans, meta, first)
            root = zarr.open_group(self.path, mode="a", zarr_format=3)  # the store's root group
            if "store_id" not in root.attrs:
                root.attrs["store_id"] = uuid.uuid4().hex
            (staging / modality).rename(self.path / modality)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _consolidate(self.path)
        self._chunk_indexes.pop(modality, None)
        self._patch_indexes.forget(self.path / modality)

    def write_chunk(self, modality: Modality, span: ChunkSpan, patch_ids: Sequence[str], embeddings: np.ndarray,
                    locations: tuple[Sequence, Sequence] | None = None) -> None:
        """Write one chunk's embeddings into its region (and the patches' lat, lon where the reader
        found them and the store has none yet), then mark the chunk done: `ShardWriter` for one
        chunk (a run of many chunks should use one writer, which writes each shard once)."""
        from rsretrieve.store.writer import ShardWriter

        with ShardWriter(self, modality, [span]) as writer:
            writer.add(span, patch_ids, embeddings, locations)

    def rows_of(self, modality: Modality, patch_ids: Sequence[str]) -> dict[str, int]:
        """{id: store row} of those of `patch_ids` the group holds (read a slab at a time: `find_rows`)."""
        from rsretrieve.store.read import find_rows

        return find_rows(self._group(modality, "r")["patch_id"], patch_ids)

    def zarr_group(self, modality: Modality, mode: str = "r") -> zarr.Group:
        """The modality's Zarr group itself (its arrays read without xarray)."""
        return self._group(modality, mode)

    def _group(self, modality: Modality, mode: str) -> zarr.Group:
        try:
            return zarr.open_group(self.path / modality, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(located(self.path, f"no {modality} group ({exc})")) from None
        except (ValueError, KeyError, TypeError) as exc:  # zarr.json that is not JSON, or not zarr's
            raise StoreError(located(self.path / modality / "zarr.json", f"unreadable store metadata ({_short(exc)}); "
                                     "run `rsretrieve verify`")) from None

    def _chunk_index(self, modality: Modality, group: zarr.Group, key: str) -> int:
        """Position of a chunk in the ledger; the keys are read once per store object."""
        if modality not in self._chunk_indexes:
            self._chunk_indexes[modality] = {str(k): i for i, k in enumerate(group["chunk_key"][:])}
        return self._chunk_indexes[modality][key]

    def _check_sibling(self, modality: Modality, provenance: dict) -> None:
        """A store's S1 and S2 groups must come from one model: cross-modal search compares them."""
        for other in self.modalities():
            if other != modality and differences(self.provenance(other), provenance, MODEL_KEYS):
                existing = self.provenance(other)
                raise StoreError(
                    located(
                        self.path,
                        f"its {other.upper()} embeddings come from {describe(existing)}, so {modality.upper()} embeddings of "
                        f"{describe(provenance)} cannot join them (cross-modal search compares the two); use another --store",
                    )
                )


def _moved(made_from: dict | None, asked: dict | None) -> bool:
    """Whether two dataset records name the same patches (equal fingerprints, both known), wherever
    they lie: a moved root is the same data, and its new path is recorded (`record_root`)."""
    fingerprint = (made_from or {}).get("patches_sha256")
    return fingerprint is not None and fingerprint == (asked or {}).get("patches_sha256")


def slab_end(spans: Sequence[ChunkSpan], start: int) -> int:
    """The chunk after the last of the slab beginning at chunk `start` (at least one chunk, at most
    `SLAB_ROWS` rows)."""
    end = start + 1
    while end < len(spans) and spans[end].stop - spans[start].start <= layout.SLAB_ROWS:
        end += 1
    return min(end, len(spans))


def _append_slabs(group_path: Path, spans: Sequence[ChunkSpan], meta, done: int) -> None:
    """Write the coordinates and ledger of chunks `done:` of a group being created, slab by slab."""
    group = zarr.open_group(group_path, mode="r+", zarr_format=3)
    while done < len(spans):
        end = slab_end(spans, done)
        first_row, last_row = spans[done].start, spans[end - 1].stop
        resize_and_fill(group_path, group, spans[:end], meta.slice(first_row, last_row - first_row), first_row)
        extend_ledger(group, spans[:end])
        done = end


def _short(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _consolidate(path: Path) -> None:
    """Consolidate the whole store's metadata at its root, where xarray looks for it. Shapes never
    change after a group is created, so once per group creation keeps every later open fast."""
    import warnings

    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is a zarr-python extension of the v3 spec; xarray uses it
        warnings.simplefilter("ignore", category=UserWarning)
        try:
            zarr.consolidate_metadata(path)
        except (ValueError, KeyError, TypeError) as exc:  # a zarr.json that is not JSON, or not zarr's
            raise StoreError(located(path, f"unreadable store metadata ({_short(exc)}); run `rsretrieve verify`")) from None
