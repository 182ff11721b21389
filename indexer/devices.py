"""Where the model runs decides its device, batch size and compute precision: they are resolved on
the encoder workers (or given by flags), never on the client, which may be a login node without a
GPU driving `--scheduler tcp://gpu-node:8786`.

`resolve_on_workers` asks every encoder worker (`client.run`, a few milliseconds) what the spec
resolves to there, and returns the spec with batch size and precision made explicit, so that
grouping (`indexer.batching`) and the store's provenance follow the devices that will encode.
`--device cuda` on workers without CUDA fails in one line naming those workers.

A store keeps the compute precision it was encoded at (`provenance["precision"]`, part of its
identity): `with_store_precision` adopts it when none was asked and refuses another one in one
line naming the flag that resumes it.
"""

from __future__ import annotations

from dataclasses import replace

from rsretrieve.errors import RSRetrieveError, StoreError, located
from rsretrieve.indexer.cluster import ENCODER_RESOURCE
from rsretrieve.indexer.encoder import EncoderSpec
from rsretrieve.provenance import stored_precision


def resolve_here(spec: EncoderSpec) -> dict:
    """What `spec` resolves to in this process (run on each encoder worker): its device, batch size
    and precision, or the reason it cannot run here."""
    import torch

    try:
        device = spec.resolved_device()
    except RSRetrieveError:
        return {"cuda": False, "device": None}
    return {"cuda": torch.cuda.is_available(), "device": device, "batch_size": spec.resolved_batch_size(),
            "precision": spec.resolved_precision(device)}


def encoder_workers(client) -> dict[str, str]:
    """{address: name} of the workers that encode: those declaring the encoder resource, or every
    worker on a cluster that declares none (any of them may run an encode task there)."""
    workers = client.scheduler_info().get("workers", {})
    declared = {a: w for a, w in workers.items() if ENCODER_RESOURCE in w.get("resources", {})}
    return {address: str(info.get("name", address)) for address, info in (declared or workers).items()}


def resolve_on_workers(client, spec: EncoderSpec) -> EncoderSpec:
    """`spec` with the batch size and precision the encoder workers resolve it to. One-line
    RSRetrieveError when `--device cuda` meets encoder workers without CUDA (named), or when the
    workers would encode at different precisions (a store holds one)."""
    workers = encoder_workers(client)
    if not workers:
        raise RSRetrieveError("the Dask cluster has no worker to encode on")
    found = client.run(resolve_here, spec, workers=list(workers))
    lacking = sorted(f"{workers[a]} ({a})" if workers[a] != a else a for a, r in found.items() if r["device"] is None)
    if lacking:
        raise RSRetrieveError(f"--device cuda: the encoder worker(s) {', '.join(lacking)} have no CUDA device; start them on GPU "
                              "nodes, or pass --device cpu")
    precisions = {r["precision"] for r in found.values()}
    if len(precisions) > 1:
        by = ", ".join(f"{workers[a]} {r['device']} {r['precision']}" for a, r in sorted(found.items()))
        raise RSRetrieveError(f"the encoder workers would encode at different precisions ({by}); pass --device or --precision")
    first = next(iter(found.values()))
    return replace(spec, batch_size=spec.batch_size or first["batch_size"], precision=first["precision"])


def with_store_precision(spec: EncoderSpec, provenance: dict, where: str, modality: str) -> EncoderSpec:
    """`spec` at the precision a store group was encoded at: adopted when `--precision` was left
    to auto, refused in one line naming the flag when another one was asked."""
    stored = stored_precision(provenance)
    asked = spec.precision
    if asked != "auto" and EncoderSpec.canonical_precision(asked) != stored:
        raise StoreError(located(where, f"holds {modality.upper()} embeddings computed in {stored}, not "
                                        f"{EncoderSpec.canonical_precision(asked)}: a store keeps the precision it was "
                                        f"encoded at — pass --precision {stored} (or leave --precision out), or use another --store"))
    return replace(spec, precision=stored)
