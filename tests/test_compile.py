"""`--compile` at fixed shapes (issue 28, defect 2): every group's tail batch is padded to the
compiled batch size and the pad rows dropped, so a run compiles once per modality instead of once
per tail size (until torch's recompile limit dropped it to eager), and gives the eager vectors.

Runs the CPU inductor backend on csmoe-tiny (about a minute to compile on two cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsretrieve.datasets import open_dataset
from rsretrieve.indexer.encoder import EncoderSpec, encode_group
from rsretrieve.models.inference import embed_raw

MODEL = "csmoe-tiny"
GROUPS = ([0], [0, 1], [0, 1, 2], [3, 4])  # 5, 10, 15, 9 patches: tails of 5, 2, 7 and 1 at batch 8


@pytest.fixture(scope="module")
def chunks_and_batches():
    ds = open_dataset("sample", include_snow_cloud=True, chunk_size=5)
    chunks = ds.chunks("s2")
    assert [c.n_patches for c in chunks] == [5, 5, 5, 5, 4]
    return chunks, [ds.read_chunk(c) for c in chunks]


def run_groups(spec: EncoderSpec, chunks, batches) -> list[np.ndarray]:
    out = []
    for group in GROUPS:
        results, _ = encode_group([batches[i] for i in group], [chunks[i] for i in group], spec)
        out.append(np.concatenate([r.embeddings for r in results]))
    return out


def test_a_compiled_run_compiles_once_and_gives_the_eager_vectors(chunks_and_batches):
    from torch._dynamo.utils import counters

    chunks, batches = chunks_and_batches
    eager = run_groups(EncoderSpec(MODEL, "cpu", 8), chunks, batches)
    torch._dynamo.reset()
    counters.clear()
    compiled = run_groups(EncoderSpec(MODEL, "cpu", 8, compile=True), chunks, batches)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one shape: (8, C, H, W) of S2
    assert not counters["recompiles"], dict(counters["recompiles"])
    for a, b in zip(eager, compiled):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_padding_drops_the_pad_rows_and_changes_no_vector(chunks_and_batches):
    """Eager, so it is quick: the padded tail gives each patch the vector it has unpadded."""
    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.pixels import RawPixels

    _, batches = chunks_and_batches
    model = load_model(MODEL)
    raw = RawPixels.concat([b.pixels for b in batches[:2]])  # 10 patches: a tail of 2 at batch 8
    plain = embed_raw(model, raw, "s2", "cpu", 8)
    padded = embed_raw(model, raw, "s2", "cpu", 8, fixed_shape=True)
    assert padded.shape == plain.shape == (10, model.config.embed_dim)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
