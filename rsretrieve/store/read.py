"""Reading a store group: open it, select rows, stream its embeddings L2-normalised; the xarray view
that `EmbeddingStore.open` gives (the ledger among the coordinates, `patch_id` an index).

The store is never loaded whole: `ds.embedding` is read in slices of `batch_size` rows, by
`read_rows` alone (tests spy on it to check that batches are respected).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsretrieve.errors import StoreError

DEFAULT_BATCH = 65_536
ID_SLAB = 1 << 20  # patch ids compared a slab at a time: one shard of the coordinate (`store.layout`)
# the resumability ledger: coordinates on `chunk` (data variables in stores written before)
LEDGER = ("chunk_key", "chunk_start", "chunk_stop", "chunk_done", "chunk_valid")
BOOKKEEPING = (*LEDGER, "embedding_crc")  # coordinates, not data: `data_vars` is the data alone


def read_rows(ds, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of `ds.embedding` as float32. The only place embeddings are read (tests
    spy on it to check that batches are respected)."""
    return np.asarray(ds["embedding"][start:stop].values, dtype=np.float32)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True)
    if x.ndim != 2:
        raise ValueError(f"expected a (n, dim) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def as_strings(values) -> np.ndarray:
    """Any string-like array (object, <U, numpy StringDType from Zarr v3) -> object array of str."""
    return np.array([str(v) for v in np.asarray(values).tolist()], dtype=object)


def coord_values(ds, name: str) -> np.ndarray | None:
    if name in ds.coords or name in ds.variables:
        return np.asarray(ds[name].values)
    return None


def selection_mask(ds, rows: np.ndarray | Sequence[int] | None = None, split: str | Sequence[str] | None = None,
                   pair_ids: Sequence[str] | None = None) -> np.ndarray:
    """Boolean (patch,) mask of the rows to index: `rows` (bool mask or row indices) AND `split`
    AND `pair_ids` AND the store's `valid` flag (rows not yet encoded or skipped are never indexed)."""
    n = int(ds.sizes["patch"])
    mask = np.ones(n, dtype=bool)
    if rows is not None:
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise ValueError(f"row mask has shape {rows.shape}, the store group has {n} rows")
            mask &= rows
        else:
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"row indices out of range for a store group of {n} rows")
            chosen = np.zeros(n, dtype=bool)
            chosen[rows.astype(np.int64)] = True
            mask &= chosen
    if split is not None:
        splits = coord_values(ds, "split")
        if splits is None:
            raise StoreError("the store group has no `split` coordinate; cannot select a split")
        wanted = [split] if isinstance(split, str) else list(split)
        mask &= np.isin(as_strings(splits), np.array(wanted, dtype=object))
    if pair_ids is not None:
        pairs = coord_values(ds, "pair_id")
        if pairs is None:
            raise StoreError("the store group has no `pair_id` coordinate; cannot select pairs")
        mask &= np.isin(as_strings(pairs), np.array([str(p) for p in pair_ids], dtype=object))
    if "valid" in ds.variables:
        mask &= np.asarray(ds["valid"].values, dtype=bool)
    return mask


def iter_embeddings(ds, mask: np.ndarray | None = None, batch_size: int = DEFAULT_BATCH):
    """Yield (rows int64, normalised float32 vectors) for the selected rows, `batch_size` store rows
    at a time. Slabs without a selected row are not read."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    n = int(ds.sizes["patch"])
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        keep = np.ones(stop - start, dtype=bool) if mask is None else mask[start:stop]
        if not keep.any():
            continue
        block = read_rows(ds, start, stop)
        rows = np.arange(start, stop, dtype=np.int64)[keep]
        block = block[keep]
        if not np.isfinite(block).all():
            bad = rows[~np.isfinite(block).all(axis=1)][:3].tolist()
            raise StoreError(f"embeddings of rows {bad} are not finite (not encoded yet?)")
        yield rows, normalise_rows(block)


def provenance_of(ds) -> dict:
    prov = ds.attrs.get("provenance", {})
    if isinstance(prov, str):
        prov = json.loads(prov)
    return dict(prov)


def open_group(path: str | Path, modality: str):
    """`xr.open_zarr` of one store group; consolidated metadata when the store has it."""
    import xarray as xr

    try:
        return xr.open_zarr(path, group=modality, consolidated=True)
    except (KeyError, FileNotFoundError, ValueError):
        return xr.open_zarr(path, group=modality, consolidated=False)


def ledger_as_coords(ds):
    """The ledger among the coordinates: stores written before it became coordinates list it as
    data variables."""
    return ds.set_coords([name for name in BOOKKEEPING if name in ds.data_vars])


class PatchIndexes:
    """`patch_id` indexes of store groups. Building one reads every id (0.35 s for 550,000) and
    `Archive.search` opens the group for each query, so each is kept while the group's patch_id
    array on disk is the same one (a group made again has new files)."""

    def __init__(self) -> None:
        self._kept: dict[Path, tuple[tuple[int, int], object]] = {}  # group dir: (identity, Coordinates)

    def apply(self, group_dir: Path, ds):
        """`ds` (the group at `group_dir`) with `patch_id` as an index (`ds.sel(patch_id=...)`)."""
        import xarray as xr

        if "patch_id" not in ds.coords:
            return ds
        identity = _file_identity(Path(group_dir) / "patch_id" / "zarr.json")
        kept = self._kept.get(Path(group_dir))
        if identity is None or kept is None or kept[0] != identity:
            kept = (identity, xr.Coordinates.from_xindex(ds.set_xindex("patch_id").xindexes["patch_id"]))
            if identity is not None:
                self._kept[Path(group_dir)] = kept
        return ds.assign_coords(kept[1])

    def forget(self, group_dir: Path) -> None:
        self._kept.pop(Path(group_dir), None)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None if it cannot be read: tells a file written again apart."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def find_rows(patch_id_array, patch_ids: Sequence[str]) -> dict[str, int]:
    """{id: the first row holding it} for those of `patch_ids` that a group's 1-d `patch_id` array
    (a zarr array) holds. The ids are read and matched (pyarrow's hash `is_in`) a slab of ID_SLAB
    at a time, stopping once all are found: an archive of 10^8 ids (~10 GB as Python strings) is
    never held whole."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = list(dict.fromkeys(map(str, patch_ids)))
    value_set = pa.array(wanted, pa.string())
    found: dict[str, int] = {}
    n = int(patch_id_array.shape[0])
    for start in range(0, n, ID_SLAB):
        if len(found) == len(wanted):
            break
        ids = pa.array(np.asarray(patch_id_array[start:start + ID_SLAB]).astype(object), pa.string())
        hits = np.flatnonzero(pc.is_in(ids, value_set=value_set).to_numpy(zero_copy_only=False))
        for row in hits.tolist():
            found.setdefault(ids[row].as_py(), start + row)
    return found
