"""Building and growing an ``ivfpq-disk`` index on a Dask cluster.

    with Client(LocalCluster(n_workers=2, threads_per_worker=1)) as client:
        index = build_index(client, "stores/big.zarr", "s2")          # train here, add on the workers
        index.save(directory, store_id=...)
        extend_index(client, index, new_rows)                           # a grown store: one more part

The client trains once on a sample read from the store, writes the trained empty index to a
staging folder, and submits one task per slice of store rows (`ondisk_ivf.add_slice`): each task
opens the store itself, limits faiss to its share of its worker's cores, encodes its rows into a
copy of the trained index and writes it as a part file. The client then merges the parts into one
on-disk index.ivfdata. The staging folder must be visible to the workers (a local cluster, or a
shared file system), as the store already is.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from rsretrieve.indexer.cluster import task_resources
from rsretrieve.retrieval.faiss_index import EmbeddingIndex


def build_index(client, store_path: str | Path, modality: str, *, work_dir: str | Path | None = None, **params) -> EmbeddingIndex:
    """An ``ivfpq-disk`` index of the store group's valid rows, its parts added on `client`'s
    workers. `params`: those of `EmbeddingIndex.build` (rows, split, seed, target_recall, tune,
    nlist, m, nprobe, k_factor, slice_rows, ...)."""
    params.setdefault("kind", "ivfpq-disk")
    return EmbeddingIndex.build(store_path, modality, mapper=dask_mapper(client), work_dir=work_dir, **params)


def extend_index(client, index: EmbeddingIndex, rows=None, source=None, **options) -> int:
    """Add store rows the index has not seen (default: those past its `n_store_rows`); for
    ``ivfpq-disk`` the new part is encoded on the workers. Returns the number added."""
    return index.extend(source, index.modality, rows, mapper=dask_mapper(client), **options)


def dask_mapper(client):
    """`mapper(fn, tasks) -> results` running one Dask task per slice, each limited to its share of
    its worker's cores: on reader slots where the cluster declares them, or, for tasks that assign
    on a GPU (`use_gpu`), on encoder slots (one GPU each), so that no reader process touches a GPU."""

    def run(fn, tasks: list) -> list:
        if not tasks:
            return []
        threads = thread_share(client)
        read, encode = task_resources(client)
        if encode and any(getattr(task, "use_gpu", False) for task in tasks) and faiss_gpus_on_encoders(client):
            read = encode
        # scattered, not embedded in the graph: each task carries its rows (8 B each) and the tuning queries
        data = client.scatter([replace(task, threads=threads) for task in tasks])
        return client.gather(client.map(fn, data, pure=False, resources=read))

    return run


def faiss_gpus_on_encoders(client) -> bool:
    """Whether faiss sees a GPU on some encoder worker (asked there: the client may have none)."""
    from rsretrieve.indexer.devices import encoder_workers
    from rsretrieve.retrieval.gpu import gpu_count

    return any(n > 0 for n in client.run(gpu_count, workers=list(encoder_workers(client))).values())


def thread_share(client) -> int:
    """faiss threads a task may use: a worker host's cores over the task slots on that host (the
    smallest share, so that no host is oversubscribed)."""
    workers = client.scheduler_info().get("workers", {})
    if not workers:
        return 1
    cores = client.run(os.cpu_count)  # {worker address: cores of its host}
    slots: dict[str, int] = {}
    for address, info in workers.items():
        host = info.get("host", address)
        slots[host] = slots.get(host, 0) + int(info.get("nthreads", 1))
    shares = [int(cores.get(address) or 1) // max(1, slots[info.get("host", address)]) for address, info in workers.items()]
    return max(1, min(shares))
