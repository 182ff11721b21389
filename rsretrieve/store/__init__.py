"""The embedding store: one Zarr v3 group per modality, written chunk by chunk, read with xarray.

    store = EmbeddingStore("stores/sample--csmoe-p16.zarr")
    ds = store.open("s2")                       # xarray Dataset: embedding (patch, dim), coords
    for rows, vectors in iter_embeddings(ds):   # L2-normalised, streamed
        ...
"""

from rsretrieve.store import checksum
from rsretrieve.store.read import DEFAULT_BATCH, iter_embeddings, normalise_rows, open_group, provenance_of, selection_mask
from rsretrieve.store.zarr_store import ChunkSpan, EmbeddingStore

checksum.install()  # every chunk checked on read, and written even when it holds only fill values

__all__ = [
    "DEFAULT_BATCH",
    "ChunkSpan",
    "EmbeddingStore",
    "iter_embeddings",
    "normalise_rows",
    "open_group",
    "provenance_of",
    "selection_mask",
]
