"""CSMAE's published checkpoints: the importer, and embeddings equal to CSMAE's own code.

`tests/data/csmae/` was made by `tools/golden/make_csmae_golden.py` with CSMAE's backbone (timm 0.9.2)
and its retrieval data pipeline, on a small checkpoint with random weights and random LayerNorms
(weights.ckpt + cfg.yaml, in CSMAE's published layout); golden.json says exactly what ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from rsretrieve.errors import CheckpointError, StoreError
from rsretrieve.models import create_model, load_model
from rsretrieve.models.csmae import csmae_variant, infer_csmae_config, strip_backbone

DATA = Path(__file__).resolve().parent / "data" / "csmae"
CKPT = DATA / "weights.ckpt"
GOLDEN = np.load(DATA / "golden.npz")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def rsretrieve_cli(*args, workspace: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "RSRETRIEVE_WORKSPACE": str(workspace), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "rsretrieve", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_importer_reads_the_published_layout():
    model = load_model(CKPT)
    cfg = model.config
    assert (cfg.embed_dim, cfg.num_heads, cfg.depth_modality, cfg.depth_cross, cfg.patch_size, cfg.img_size) == (48, 3, 2, 1, 15, 120)
    assert cfg.global_pool == "avg" and cfg.norm_eps == 1e-6 and cfg.preprocessing.name == "csmae-ben1"
    assert model.fc_norm is not None
    assert model.source["format"] == "csmae-lightning" and model.source["decoder"] == "specific"
    assert model.source["cfg"].endswith("cfg.yaml")  # the heads came from it: 48 is no vit_* width
    assert model.provenance["config"]["global_pool"] == "avg" and model.provenance["preprocessing"]["transpose"] is True


@pytest.mark.parametrize("encoder, decoder_keys, variant, registered", [
    ((10, 2), ("decoder_s1_to_s2", "decoder_s2_to_s1"), "csmae_sesd", "csmae-p15"),
    ((10, 2), ("decoder",), "csmae_secd", "csmae-p15"),
    ((12, 0), ("decoder_s1_to_s2", "decoder_s2_to_s1"), "csmae_cesd", "csmae-ce-p15"),
    ((12, 0), ("decoder",), "csmae_cecd", "csmae-ce-p15"),
])
def test_the_four_published_configurations_are_recognised(encoder, decoder_keys, variant, registered):
    """ViT-B/15 state dicts shaped like the four published checkpoints (on the meta device)."""
    config = create_model(registered, device="meta").config
    assert (config.depth_modality, config.depth_cross) == encoder
    state = {f"backbone.{k}": v for k, v in create_model(registered, device="meta").state_dict().items()}
    state.update({f"{d}.decoder_embed.weight": torch.empty(512, 768, device="meta") for d in decoder_keys})
    backbone, decoding = strip_backbone(state)
    inferred = infer_csmae_config(backbone, "weights.ckpt", {})  # vit_base: 12 heads from the width
    assert inferred.name == registered and inferred.num_heads == 12 and inferred.global_pool == "avg"
    assert csmae_variant(inferred, decoding) == variant


def test_embeddings_equal_csmaes_own_code():
    """The library path: raw sample pixels -> the model's preprocessing -> the model."""
    from rsretrieve.datasets import open_dataset
    from rsretrieve.models import embed_raw
    from rsretrieve.pixels import RawPixels

    model = load_model(CKPT)
    ds = open_dataset("sample")
    for modality, ids in (("s2", GOLDEN["s2_ids"]), ("s1", GOLDEN["s1_ids"])):
        raw = RawPixels.concat([ds.read_patch(str(i), modality) for i in ids])
        cos = cosines(embed_raw(model, raw, modality), GOLDEN[modality])
        assert cos.min() >= 0.9999, (modality, cos.min())


def test_cli_encode_eval_and_info_with_the_csmae_checkpoint(tmp_path):
    ws = tmp_path / "ws"
    enc = rsretrieve_cli("encode", "--checkpoint", CKPT, "--modality", "both", workspace=ws)
    assert enc.returncode == 0, enc.stderr
    (store,) = (ws / "stores").glob("*.zarr")
    for modality, ids in (("s2", GOLDEN["s2_ids"]), ("s1", GOLDEN["s1_ids"])):
        ds = xr.open_zarr(store, group=modality)
        row = {str(p): i for i, p in enumerate(ds["patch_id"].values.tolist())}
        stored = ds["embedding"].values[[row[str(i)] for i in ids]]
        cos = cosines(stored, GOLDEN[modality])
        assert cos.min() >= 0.9999, (modality, cos.min())
        assert ds.attrs["provenance"]["preprocessing"]["name"] == "csmae-ben1"
    ev = rsretrieve_cli("eval", "sample", workspace=ws)  # the checkpoint is remembered
    assert ev.returncode == 0, ev.stderr
    assert "F1@3" in ev.stdout and "RANDOM" not in ev.stdout + ev.stderr  # a checkpoint, not a registered config
    info = rsretrieve_cli("info", workspace=ws)
    assert "CSMAE checkpoint" in info.stdout and "decoder specific" in info.stdout
    assert "csmae-ben1 (BigEarthNet v1" in info.stdout and "H/W transposed" in info.stdout


def test_a_query_goes_through_the_archives_preprocessing(tmp_path):
    """An archive patch's folder as a query tile embeds exactly as the archive did: itself is first,
    at cosine 1 (another preprocessing - no transpose, other statistics - would not give 1)."""
    from rsretrieve.datasets import sample_root
    from rsretrieve.retrieval import Archive

    ws = tmp_path / "ws"
    assert rsretrieve_cli("index", "--checkpoint", CKPT, "--modality", "s2", workspace=ws).returncode == 0
    (store,) = (ws / "stores").glob("*.zarr")
    name = str(GOLDEN["s2_ids"][3])
    (folder,) = sample_root().glob(f"BigEarthNet-S2/*/{name}")
    result = Archive.open(store, ws / "indexes").query_tile(folder, target="s2", k=3)
    assert result.hits[0].patch_id == name and result.hits[0].score > 0.9999


def test_a_store_refuses_embeddings_of_another_preprocessing(tmp_path):
    from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
    from rsretrieve.models import register_config
    from rsretrieve.models.registry import REGISTRY, get_config
    from rsretrieve.recipes import BENV2_NEAREST

    store = tmp_path / "s.zarr"
    spec = DatasetSpec("sample")
    from distributed import Client, LocalCluster

    twin = get_config("csmae-tiny").replace(name="csmae-tiny", preprocessing=BENV2_NEAREST, global_pool="avg")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        encode(spec, "s2", store, EncoderSpec("csmae-tiny", "cpu", 8), client=client)
        original = REGISTRY["csmae-tiny"]
        register_config(twin)  # same name and weights, another preprocessing
        try:
            with pytest.raises(StoreError, match="preprocessing"):
                encode(spec, "s2", store, EncoderSpec("csmae-tiny", "cpu", 8), client=client)
        finally:
            register_config(original)


def test_plain_weights_need_their_config_and_say_which_keys_do_not_fit(tmp_path):
    from safetensors.torch import save_file

    model = create_model("csmoe-tiny", seed=3)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="--model NAME"):
        load_model(path)
    loaded = load_model(path, config="csmoe-tiny")
    assert loaded.source == {"format": "state-dict"}
    x = torch.randn(2, 10, 64, 64)
    torch.testing.assert_close(loaded.embed(x, "s2"), model.embed(x, "s2"))
    with pytest.raises(CheckpointError, match=r"csmae-tiny.*(missing|unexpected) keys: .*(mlp\.|fc_norm)"):
        load_model(path, config="csmae-tiny")
    other = tmp_path / "weights.bin"
    other.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match=r"save_file.*rsretrieve convert") as e:
        load_model(other)
    assert "\n" not in str(e.value)


def test_the_fixed_position_embedding_is_maes_layout():
    """CSMAE's checkpoint carries the pos_embed its own `generate_2d_sincos_pos_embed` made: ours,
    built from scratch, is the same (first half of the channels: the column, second: the row)."""
    from rsretrieve.models.csmoe import _sincos_pos_embed

    state = torch.load(CKPT, map_location="cpu", weights_only=True)["state_dict"]
    reference = state["backbone.pos_embed"]
    ours = _sincos_pos_embed(48, 8)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    grid = ours[0, 1:].reshape(8, 8, 48)
    assert torch.equal(grid[0, 3, :24], grid[5, 3, :24]) and not torch.equal(grid[3, 0, :24], grid[3, 5, :24])
