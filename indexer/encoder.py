"""Encode tasks: the raw batches of a group of chunks -> embeddings, on an encoder worker.

An encoder worker holds one copy of the model (loaded on first use, per process), on its device:
its GPU (bf16 weights, optionally `torch.compile`d) or the CPU (float32, on all the worker's
cores). A group of chunks is encoded as one stream of GPU-sized batches (`embed_raw` copies the
next batch while the model runs on this one), then split back per chunk for the store.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.datasets import Chunk, PatchBatch
from rsretrieve.errors import CheckpointError, RSRetrieveError, located
from rsretrieve.models.inference import embed_raw
from rsretrieve.pixels import RawPixels

_LOCK = threading.Lock()
_MODELS: dict = {}


@dataclass(frozen=True)
class EncoderSpec:
    """Which model to run where: a config name or checkpoint path (with, for plain weights, the
    registered config they fit), a device, a batch size, the weights' precision, torch.compile."""

    model: str = "csmoe-p16"
    device: str = "auto"  # auto | cpu | cuda
    batch_size: int | None = None  # default: 32 on CPU, 512 on a GPU
    config: str | None = None
    precision: str = "auto"  # compute precision: auto (bfloat16 weights on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model, at fixed shapes (`embed_raw` pads the last batch)

    @staticmethod
    def canonical_precision(name: str) -> str:
        """float32 | bfloat16 | float16 (also accepted: fp32, bf16, fp16)."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RSRetrieveError("--device cuda: no CUDA device is available on this machine")
        return self.device

    def resolved_batch_size(self) -> int:
        return self.batch_size or (512 if self.resolved_device().startswith("cuda") else 32)

    def resolved_precision(self, device: str) -> str:
        """The compute precision on `device`: auto is bfloat16 on CUDA (1.2x autocast), float32 on a CPU."""
        if self.precision == "auto":
            return "bfloat16" if device.startswith("cuda") else "float32"
        return self.canonical_precision(self.precision)


@dataclass
class ChunkResult:
    key: str
    patch_ids: list[str]
    embeddings: np.ndarray  # (n, D) float32
    skipped: list[tuple[str, str]]
    locations: tuple[list, list] | None = None  # the patches' lat, lon as the reader found them
    converted: list[tuple[str, str]] = field(default_factory=list)  # (patch_id, what the reader converted)


def encode_group(batches: list[PatchBatch], chunks: list[Chunk], spec: EncoderSpec,
                 chunk_hook: Callable[[Chunk], None] | None = None) -> tuple[list[ChunkResult], dict]:
    """The task an encoder worker runs: the chunks' raw batches as one stream of model batches.
    Returns a result per chunk and the provenance of the model that ran."""
    if chunk_hook is not None:
        for chunk in chunks:
            chunk_hook(chunk)
    device = spec.resolved_device()  # the local cluster pins one GPU per encoder worker (CUDA_VISIBLE_DEVICES)
    model = worker_model(spec, device)
    # batches of one band layout are embedded together (a chunk whose 20 m bands came on the 10 m
    # grid does not stack with one whose bands are at their native 60 px: `benv2_patch.assemble`)
    layouts: dict[tuple, list[int]] = {}
    for i, batch in enumerate(batches):
        if len(batch):
            layouts.setdefault((batch.pixels.fine_bands, batch.pixels.coarse_bands), []).append(i)
    embedded = {i: np.zeros((0, model.config.embed_dim), np.float32) for i in range(len(batches))}
    for members in layouts.values():
        vectors = embed_raw(model, RawPixels.concat([batches[i].pixels for i in members]), chunks[0].modality, device,
                            spec.resolved_batch_size(), fixed_shape=spec.compile)
        ends = np.cumsum([len(batches[i]) for i in members])
        embedded.update({i: part for i, part in zip(members, np.split(vectors, ends[:-1]))})
    results = []
    for i, (chunk, batch) in enumerate(zip(chunks, batches)):
        names = batch.meta.column_names
        locations = (batch.meta["lat"].to_pylist(), batch.meta["lon"].to_pylist()) if "lat" in names and "lon" in names else None
        results.append(ChunkResult(chunk.key, list(batch.patch_ids), embedded[i], list(batch.skipped), locations,
                                   list(getattr(batch, "converted", []))))
    return results, {**model.provenance, "precision": spec.resolved_precision(device)}


def refuse_non_finite(results: list[ChunkResult], provenance: dict) -> None:
    """Readers hand over finite pixels in their physical range, so a non-finite embedding is the
    model's (NaN weights, an overflow): a CheckpointError naming the checkpoint, raised by the
    client before anything is written (the store dropped such rows as invalid, and the chunks
    stayed unencoded for ever: each run 'encoded' them again)."""
    for result in results:
        bad = ~np.isfinite(result.embeddings).all(axis=1) if len(result.embeddings) else np.zeros(0, bool)
        if bad.any():
            model = provenance.get("checkpoint_path") or provenance.get("model") or "the model"
            raise CheckpointError(located(model, f"the model gave non-finite embeddings (NaN or inf) for {int(bad.sum())} of "
                                                 f"{len(bad)} patches of chunk {result.key}; are its weights NaN?"))


def worker_model(spec: EncoderSpec, device: str):
    """The process's one copy of the model, loaded on first use."""
    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.models.csmoe import to_inference_dtype

    path = Path(spec.model)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None
    key = (spec.model, spec.config, spec.precision, spec.compile, device, stamp)
    with _LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per worker process
            if device == "cpu":
                _use_worker_cores()
            with warnings.catch_warnings():
                # random-init is stamped in the store's provenance and said by the client, once
                warnings.simplefilter("ignore", UserWarning)
                logging.getLogger("rsretrieve").setLevel(logging.ERROR)
                model = to_inference_dtype(load_model(spec.model, device=device, config=spec.config), spec.precision, device)
            _MODELS[key] = _compiled(model) if spec.compile else model
        return _MODELS[key]


def _compiled(model):
    """torch.compile the forward pass at static shapes (`embed_raw` pads every tail batch to the
    batch size, so a run compiles once per modality); the model keeps its config and provenance."""
    import torch

    model.forward_features = torch.compile(model.forward_features, dynamic=False)
    return model


def _use_worker_cores() -> None:
    """dask's nanny starts workers with OMP_NUM_THREADS=1, which would leave torch on one core: the
    encoder worker's cores are its model's (`local_cluster` gives it the machine's cores)."""
    import torch

    threads = int(os.environ.get("RSRETRIEVE_ENCODER_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
