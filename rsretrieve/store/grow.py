"""Growing a store group: the dataset gained tiles (a new Major TOM shard), the store gains rows.

The chunks a store already holds keep their rows; chunks the dataset has now and the store lacks
are appended after them, in the dataset's order. Nothing else may differ: another model, root,
subset, reader option, or a chunk that changed size or disappeared is other data, refused as
before (`EmbeddingStore.check`).

Appending is idempotent, so a crash at any point is repaired by running it again: every per-patch
array is resized first, then the new rows' coordinates are written into their region, then the
store's record of the data it was made from (its fingerprint) is updated, and the ledger is
extended last (the ledger is what says which chunks exist and which are done; its keys are
written after the other ledger arrays, and a reader takes the keys' length).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import xarray as xr

from rsretrieve.errors import StoreError, located
from rsretrieve.store.layout import ChunkSpan, ledger, patch_coords

GROWTH_KEYS = {"patches_sha256", "patches"}  # what a grown dataset may change in the store's record


def plan_spans(stored: Sequence, chunks: Sequence, where) -> tuple[list, list]:
    """(spans of every chunk in store order, the chunks the store lacks) for a dataset's chunks
    against a group's ledger. A stored chunk that changed size or is gone is refused."""
    by_key = {chunk.key: chunk for chunk in chunks}
    for span in stored:
        chunk = by_key.get(span.key)
        if chunk is None:
            raise StoreError(located(where, f"holds chunk {span.key}, which the data no longer has (a store serves the data it was "
                                            "made from; an archive may only grow): use another --store"))
        if chunk.n_patches != span.stop - span.start:
            raise StoreError(located(where, f"chunk {span.key} had {span.stop - span.start} patches, the data now lists "
                                            f"{chunk.n_patches}: use another --store"))
    known = {span.key for span in stored}
    new = [chunk for chunk in chunks if chunk.key not in known]
    spans, start = list(stored), (stored[-1].stop if stored else 0)
    for chunk in new:
        spans.append(ChunkSpan(chunk.key, start, start + chunk.n_patches))
        start += chunk.n_patches
    return spans, new


def new_rows_meta(meta, chunks: Sequence, new: Sequence) -> pa.Table:
    """The metadata rows of the `new` chunks, from the dataset's `patch_rows` (a table, or a lazy
    one: only the new rows are made), in its chunk order."""
    offsets, start = {}, 0
    for chunk in chunks:
        offsets[chunk.key] = (start, chunk.n_patches)
        start += chunk.n_patches
    parts = [meta.slice(*offsets[chunk.key]) for chunk in new]
    return pa.concat_tables(parts) if parts else meta.slice(0, 0)


def resize_and_fill(group_path, group, spans: Sequence, meta: pa.Table, old_rows: int) -> None:
    """Resize every per-patch array to the rows `spans` cover and write the new rows' coordinates
    (`meta`, in order) into their region. `group`: the zarr group opened r+; `old_rows`: the rows
    its ledger covers now."""
    rows = spans[-1].stop if spans else old_rows
    if rows - old_rows != meta.num_rows:
        raise ValueError(f"new chunks cover {rows - old_rows} rows but their metadata has {meta.num_rows}")
    for _, array in group.arrays():
        if array.metadata.dimension_names and array.metadata.dimension_names[0] == "patch":
            array.resize((rows, *array.shape[1:]))
    coords = {name: value for name, value in patch_coords(meta).items() if name in group}
    if coords and rows > old_rows:  # through xarray: it encodes strings and times as the group's arrays expect
        xr.Dataset(coords=coords).to_zarr(group_path.parent, group=group_path.name, region={"patch": slice(old_rows, rows)},
                                          mode="r+", zarr_format=3, consolidated=False)


def extend_ledger(group, spans: Sequence) -> None:
    """Append the chunks past the ledger's end to it; the keys last (they say how long it is)."""
    n_old = int(group["chunk_key"].shape[0])
    new_spans = list(spans[n_old:])
    if not new_spans:
        return
    entries = ledger(new_spans)
    for name in (*[n for n in entries if n != "chunk_key"], "chunk_key"):
        if name not in group:
            continue
        array = group[name]
        array.resize((len(spans),))
        values = entries[name][1]
        array[n_old:] = np.array([str(v) for v in values], dtype=array.dtype) if name == "chunk_key" else values
