import math
import warnings
from pathlib import Path

import pytest
import torch

from rsretrieve.models.checkpoint import load_model, save_model
from rsretrieve.models import CSMoEConfig, create_model, encode, get_config, list_models
from rsretrieve.errors import CheckpointError
from rsretrieve.models.macs import TABLE_IV, count_macs, count_params, model_macs, model_report, reference_vit

SAMPLE = Path(__file__).resolve().parents[1] / "rsretrieve" / "data" / "sample"


# ---------------------------------------------------------------------------------------------
# real sample pixels (BigEarthNet-v2 patches shipped in rsretrieve/data/sample)
# ---------------------------------------------------------------------------------------------


_CACHE: dict = {}


def real_pixels(modality: str, n: int = 8) -> torch.Tensor:
    """(n, C, 120, 120) normalised float32 from real BigEarthNet-v2 sample patches (raw reader
    values through CSMoE's preprocessing, without the resize)."""
    if modality not in _CACHE:
        from rsretrieve.datasets import open_dataset
        from rsretrieve.models.preprocessing import prepare
        from rsretrieve.pixels import RawPixels
        from rsretrieve.recipes import BENV2_NEAREST

        ds = open_dataset("sample")
        raw = RawPixels.concat([ds.read_chunk(c).pixels for c in ds.chunks(modality)])
        assert len(raw) >= 8
        _CACHE[modality] = prepare(raw, modality, BENV2_NEAREST, 120)
    px = _CACHE[modality]
    reps = math.ceil(n / len(px))
    return px.repeat(reps, 1, 1, 1)[:n].clone() if reps > 1 else px[:n].clone()


# ---------------------------------------------------------------------------------------------
# MAC / parameter counting against Table IV
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, table_i", [
    # Prithvi-EO-2.0 300M: ViT-L/16 at 224 px, 6 bands; 600M: ViT-H/14 (the paper's Table I)
    (dict(img_size=224, patch_size=16, depth=24, dim=1024, heads=16, in_chans=6, classes=0), 59.85),
    (dict(img_size=224, patch_size=14, depth=32, dim=1280, heads=16, in_chans=6, classes=0), 162.18),
    # CSMAE's S2 path: ViT-B/15 at 120 px with its 10 bands
    (dict(img_size=120, patch_size=15, depth=12, in_chans=10, classes=0), 5.638),
])
def test_paper_convention_reproduces_table_i_exactly(kwargs, table_i):
    """The paper's MACs are fvcore's count without the attention matrix products."""
    model, x = reference_vit(**kwargs)
    digits = 3 if table_i < 10 else 2
    assert round(count_macs(model, x, convention="paper") / 1e9, digits) == table_i
    assert round(count_macs(model, x) / 1e9, digits) != table_i  # the full fvcore count does not


def test_csmae_config_matches_table_iv_in_the_paper_convention():
    rows = {r["name"]: r for r in model_report()}
    assert abs(rows["csmae-p15"]["macs_s2_paper_convention"] / 5.64e9 - 1) <= 0.01
    assert round(model_macs("csmae-p15", "s2", convention="paper") / 1e9, 3) == 5.638


def test_dense_layer_mac_formula():
    """A dense block at N tokens costs 12 N d^2 + 2 N^2 d MACs + 2 layer norms (fvcore: 5 per element)."""
    from rsretrieve.models.csmoe import Block

    d, n = 64, 17
    blk = Block(d, 2, 4.0, True, 1e-6)
    assert count_macs(blk, torch.zeros(1, n, d)) == 12 * n * d * d + 2 * n * n * d + 2 * 5 * n * d


def test_table_iv_within_tolerance():
    rows = {r["name"]: r for r in model_report()}
    assert set(rows) == set(TABLE_IV)
    for name in ("csmoe-p14", "csmoe-p16", "csmoe-p28", "csmoe-p32"):
        r = rows[name]
        assert abs(r["params"] / TABLE_IV[name][0] - 1) <= 0.03, (name, r["params"])
        assert abs(r["macs"] / TABLE_IV[name][1] - 1) <= 0.15, (name, r["macs"])
        assert abs(r["deviations"]["macs"]) <= 0.15
        assert r["macs_s1"] < r["macs_s2"]  # paths differ only in the patch embedding (2 vs 10 channels)
        cfg = get_config(name)
        n = cfg.num_patches
        assert r["macs_s2"] - r["macs_s1"] == (cfg.s2_chans - cfg.s1_chans) * cfg.patch_size**2 * cfg.embed_dim * n
    # CSMAE: the S2 path of our dense p15 model is a ViT-B (87M)
    assert abs(rows["csmae-p15"]["params_s2_path"] / 87e6 - 1) <= 0.03
    # MACs grow with the token count
    assert rows["csmoe-p14"]["macs"] > rows["csmoe-p16"]["macs"] > rows["csmoe-p28"]["macs"] > rows["csmoe-p32"]["macs"]


def test_full_model_param_count_matches_real_build():
    # meta-device counts equal the counts of a real (small) build
    cfg = get_config("csmoe-tiny")
    assert count_params(create_model(cfg, device="meta")) == count_params(create_model(cfg))
    assert model_macs(cfg, "s2") > model_macs(cfg, "s1") > 0


# ---------------------------------------------------------------------------------------------
# forward behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["csmoe-tiny", "csmae-tiny"])
def test_shapes_and_single_modality(name):
    m = create_model(name, seed=0)
    cfg = m.config
    for mod, c in (("s1", 2), ("s2", 10)):
        x = torch.randn(3, c, cfg.img_size, cfg.img_size)
        tokens = m.forward_features(x, mod)
        assert tokens.shape == (3, 1 + cfg.num_patches, cfg.embed_dim)
        e = m.embed(x, mod)
        assert e.shape == (3, cfg.embed_dim)
        if cfg.global_pool == "token":  # CSMoE: the raw [CLS]
            torch.testing.assert_close(e, tokens[:, 0])
        else:  # CSMAE: fc_norm of the mean of the patch tokens
            torch.testing.assert_close(e, m.fc_norm(tokens[:, 1:].mean(1)))
            assert not torch.allclose(e, tokens[:, 0], atol=1e-3)
    with pytest.raises(ValueError):
        m.embed(torch.randn(1, 10, 64, 64), "s1")  # wrong channel count for S1


def test_embed_resizes_real_pixels():
    m = create_model("csmoe-tiny", seed=0)
    x = real_pixels("s2", 4)
    assert x.shape[-1] == 120
    from rsretrieve.models.preprocessing import resize_batch

    torch.testing.assert_close(m.embed(x, "s2"), m.embed(resize_batch(x, 64), "s2"))
    e = encode(m, x, "s2", "cpu")
    assert e.dtype == torch.float32 and e.shape == (4, 64) and torch.isfinite(e).all()


@pytest.mark.parametrize("modality", ["s1", "s2"])
@pytest.mark.parametrize("name", ["csmoe-tiny", "csmae-tiny"])
def test_batch_size_invariance_on_real_pixels(name, modality):
    m = create_model(name, seed=0)
    x = real_pixels(modality, 8)
    with torch.inference_mode():
        batched = m.embed(x, modality)
        single = torch.cat([m.embed(x[i : i + 1], modality) for i in range(8)])
    assert not torch.allclose(batched[0], batched[1])  # real, distinct patches
    torch.testing.assert_close(single, batched, atol=1e-5, rtol=1e-5)


def test_determinism_for_seed():
    x = real_pixels("s1", 4)
    a = create_model("csmoe-tiny", seed=3).embed(x, "s1")
    b = create_model("csmoe-tiny", seed=3).embed(x, "s1")
    c = create_model("csmoe-tiny", seed=4).embed(x, "s1")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # no randomness at inference
    m = create_model("csmoe-tiny", seed=3)
    assert torch.equal(m.embed(x, "s1"), m.embed(x, "s1"))


def test_expert_usage_per_modality():
    m = create_model("csmoe-tiny", seed=0)
    for mod in ("s1", "s2"):
        usage = m.expert_usage(real_pixels(mod, 4), mod)
        assert set(usage) == {f"blocks_{mod}.1.mlp", "blocks.0.mlp"}
        for u in usage.values():
            assert u.shape == (4,) and float(u.sum()) == pytest.approx(1.0, abs=1e-5)


def test_config_json_roundtrip():
    for name in list_models():
        cfg = get_config(name)
        assert CSMoEConfig.from_dict(cfg.to_dict()) == cfg
    assert get_config("csmoe-p16").slots_per_expert == 31  # round(1.25 * 197 / 8)


# ---------------------------------------------------------------------------------------------
# provenance and checkpoints
# ---------------------------------------------------------------------------------------------


def test_random_init_is_flagged():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        m = load_model("csmoe-tiny")
    assert m.provenance["checkpoint_sha256"] == "random-init"
    assert m.provenance["checkpoint_path"] is None
    assert m.provenance["model"] == "csmoe-tiny" and m.provenance["config"]["embed_dim"] == 64


@pytest.mark.parametrize("name", ["csmoe-tiny", "csmae-tiny"])
def test_save_load_roundtrip_bit_identical(tmp_path, name):
    import hashlib

    m = create_model(name, seed=7)
    path = save_model(m, tmp_path / "ckpt")
    assert path.name == f"{name}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-weights warning for a checkpoint
        m2 = load_model(str(tmp_path / "ckpt"))
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert m2.config == m.config
    x = real_pixels("s2", 3)
    assert torch.equal(m.embed(x, "s2"), m2.embed(x, "s2"))
    prov = m2.provenance
    assert prov["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["checkpoint_path"] == str(path)
    # file path works too
    assert torch.equal(load_model(str(path)).embed(x, "s2"), m.embed(x, "s2"))


def test_checkpoint_of_other_config_rejected(tmp_path):
    path = save_model(create_model("csmoe-tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError) as ei:
        load_model(str(path), config="csmae-tiny")
    msg = str(ei.value)
    assert msg.startswith(str(path)) and "\n" not in msg
    assert "blocks_s1.1.mlp.fc1.weight" in msg  # first missing key of the dense config
    assert "blocks_s1.1.mlp.phi" in msg  # first unexpected key


def _write(path, state, cfg):
    from safetensors.torch import save_file

    from rsretrieve.models.checkpoint import FORMAT

    save_file(state, str(path), metadata={"format": FORMAT, "config": cfg.to_json()})


def test_missing_key_and_wrong_shape_rejected(tmp_path):
    m = create_model("csmoe-tiny")
    state = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    missing = dict(state)
    del missing["blocks.0.mlp.scale"]
    _write(tmp_path / "missing.safetensors", missing, m.config)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.0\.mlp\.scale"):
        load_model(str(tmp_path / "missing.safetensors"))
    bad = dict(state)
    bad["blocks_s2.0.attn.qkv.weight"] = torch.zeros(10, 64)
    _write(tmp_path / "shape.safetensors", bad, m.config)
    with pytest.raises(CheckpointError, match=r"shape mismatch: blocks_s2\.0\.attn\.qkv\.weight \(10, 64\) vs model \(192, 64\)"):
        load_model(str(tmp_path / "shape.safetensors"))


def test_truncated_checkpoint_names_file(tmp_path):
    path = save_model(create_model("csmoe-tiny"), tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"^" + str(path).replace(".", r"\.") + ": "):
        load_model(str(path))
    with pytest.raises(CheckpointError):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match="not a registered model"):
        load_model("no-such-model")


def _fake_csmae(tmp_path, seed=5, lightning=True, extra=None):
    m = create_model("csmae-tiny", seed=seed)
    state = {f"backbone.{k}": v.clone() for k, v in m.state_dict().items()}
    state["decoder_s1.blocks.0.norm1.weight"] = torch.ones(16)  # pretraining-only parts are dropped
    state["projector.weight"] = torch.ones(8, 64)
    if extra:
        state.update(extra)
    obj = {"state_dict": state, "epoch": 3, "global_step": 100} if lightning else state
    path = tmp_path / ("csmae.ckpt" if lightning else "csmae.pt")
    torch.save(obj, path)
    return m, path


@pytest.mark.parametrize("lightning", [True, False])
def test_csmae_lightning_import(tmp_path, lightning):
    ref, path = _fake_csmae(tmp_path, lightning=lightning)
    m = load_model(str(path))
    assert m.config.name == "csmae-tiny"  # shapes inferred, heads from the matching registered config
    assert m.config.patch_size == 16 and m.config.depth_modality == 2 and m.config.depth_cross == 1
    for mod in ("s1", "s2"):
        x = real_pixels(mod, 4)
        assert torch.equal(m.embed(x, mod), ref.embed(x, mod))
    assert len(m.provenance["checkpoint_sha256"]) == 64


def test_csmae_with_unexpected_backbone_key_rejected(tmp_path):
    _, path = _fake_csmae(tmp_path, extra={"backbone.mask_token": torch.zeros(1, 1, 64)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: mask_token"):
        load_model(str(path))


def test_pickled_object_refused(tmp_path):
    import collections

    path = tmp_path / "evil.ckpt"
    # an arbitrary (non-allow-listed) Python object inside the checkpoint
    torch.save({"state_dict": {"backbone.cls_token": torch.zeros(1)}, "obj": collections.Counter("ab"), "f": Path("x")}, path)
    with pytest.raises(CheckpointError, match="refused") as ei:
        load_model(str(path))
    assert str(ei.value).startswith(str(path))


def test_bf16_autocast_path_runs_and_agrees():
    """The CUDA path uses bf16 autocast; exercise the same dtype handling with CPU autocast."""
    m = create_model("csmoe-tiny", seed=0)
    x = real_pixels("s2", 4)
    ref = m.embed(x, "s2")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.embed(x, "s2").float()
    cos = torch.nn.functional.cosine_similarity(ref, low, dim=-1)
    assert (cos > 0.98).all(), cos
