"""`rsretrieve verify`: a store's ledger against its data, and its indexes against their records.

    findings = verify_archive("stores/sample--csmoe-p16.zarr", "indexes")
    for finding in findings: print(finding)      # '<path>: <problem>; <what to do>'
"""

from __future__ import annotations

from pathlib import Path

from rsretrieve.errors import StoreError
from rsretrieve.retrieval.index_meta import damage, index_dir, read_meta
from rsretrieve.store import EmbeddingStore
from rsretrieve.store.integrity import Finding, verify


def verify_archive(store_path: str | Path, indexes_dir: str | Path) -> list[Finding]:
    """Everything wrong with a store and the indexes that belong to it (empty: all is well)."""
    store = EmbeddingStore(store_path)
    findings = verify(store)
    if findings and not store.modalities():
        return findings
    for modality in store.modalities():
        directory = index_dir(indexes_dir, store.path, store.store_id, modality)
        if directory.exists():
            findings += verify_index(directory, store.store_id, modality)
    return findings


def verify_index(directory: Path, store_id: str, modality: str) -> list[Finding]:
    """An index's metadata, its files against their sizes and SHA-256, and the store it belongs to."""
    remedy = f"run `rsretrieve index --modality {modality}` to rebuild it"
    try:
        meta = read_meta(directory)
    except StoreError as exc:
        return [Finding(str(directory), str(exc).split(": ", 1)[-1], remedy)]
    if meta.get("store_id") != store_id:
        return [Finding(str(directory), f"index belongs to another store (id {meta.get('store_id')})", remedy)]
    problem = damage(directory, meta, checksums=True)
    return [Finding(str(directory), f"damaged index: {problem}", remedy)] if problem else []
