"""Golden embeddings of the bundled sample, computed by CSMAE's own code (jakhac/CSMAE).

What it runs, all from a CSMAE checkout (`--csmae`; read, never copied into rsretrieve):
- the backbone: `src/csmae_backbone.py` `CSMAEBackbone` on timm 0.9.2 (CSMAE's pin), built as its
  `vit_*` factory builds it (LayerNorm eps 1e-6) but small: width 48, 3 heads, 2 sensor-specific
  + 1 shared layer, patch 15, 120 px, global_pool "avg"; random weights (seed 0) with every
  LayerNorm's weight and bias drawn at random too, so that `norm_s1/s2`, `norm` and `fc_norm`
  all matter;
- the data: the bundled sample's 24 real BigEarthNet-v2 pairs, read with rasterio from the release
  GeoTIFFs, written as `BigEarthNet_S1_S2_Patch` records (bigearthnet-patch-interface 0.1.2, the
  encoding CSMAE's `BENLMDBReader` reads) into `BigEarthNetEncoded.lmdb` with a `test.csv` split;
- CSMAE's retrieval pipeline: `BENDataSet(split="test", img_size=(12, 120, 120))` (its LMDB reader:
  bicubic align_corners upsampling, the `np.transpose(img, (2, 1, 0))`) with the transform
  `retrieval.py` builds (`build_transform_pipeline` with rrc off and both flips at 0: ToTensor,
  Resize(120, bicubic), Normalize with `bigearthnet_common` 2.8.0's BigEarthNet v1 statistics),
  then `backbone(X)` in eval mode under no_grad: `{"s1": ..., "s2": ...}`.

Outputs in `--out`: the Lightning-style checkpoint `weights.ckpt` (`state_dict` with the backbone
under `backbone.`, plus small stand-ins for a sensor-specific decoder under CSMAE's key names, as a
published checkpoint has) and `cfg.yaml` (the backbone kwargs, as CSMAE publishes them), and
`golden.npz` (ids and both embeddings) with `golden.json` (versions and this command).

Environment (a venv of its own; torchvision needs its CUDA-built torch, which runs on the CPU):

    python3.11 -m venv .venv-golden
    .venv-golden/bin/pip install torch==2.14.0 torchvision==0.29.0 timm==0.9.2 \
        bigearthnet-common==2.8.0 bigearthnet-patch-interface==0.1.2 "pydantic<2" natsort \
        lmdb rasterio numpy pyyaml
    .venv-golden/bin/python tools/golden/make_csmae_golden.py --csmae /path/to/CSMAE --out tests/data/csmae

One shim, for code written for an older NumPy: `np.float = float` (CSMAE's `src/pos_encoding.py`
uses the alias NumPy 1.24 removed). Nothing else of CSMAE's code is changed or replaced.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import platform
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "rsretrieve" / "data" / "sample"
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
BACKBONE_KWARGS = dict(img_size=120, patch_size=15, in_chans=12, embed_dim=48, num_heads=3,
                       multi_sensor_encoder_depth=2, cross_sensor_encoder_depth=1, mlp_ratio=4.0,
                       masking_strategy="random", global_pool="avg")
SEED = 0


def read_band(pattern: str) -> np.ndarray:
    import rasterio

    (path,) = glob.glob(pattern)
    with rasterio.open(path) as ds:
        return ds.read(1)


def sample_pairs() -> list[dict]:
    """The 24 pairs of the bundled sample: both metadata tables (the snowy/cloudy ones included)."""
    import pyarrow.parquet as pq

    rows = []
    for name in ("metadata.parquet", "metadata_for_patches_with_snow_cloud_or_shadow.parquet"):
        rows += pq.read_table(SAMPLE / name, columns=["patch_id", "s1_name", "labels"]).to_pylist()
    return sorted(rows, key=lambda r: r["patch_id"])


def write_lmdb(root: Path, pairs: list[dict]) -> None:
    import lmdb
    from bigearthnet_patch_interface.merged_interface import BigEarthNet_S1_S2_Patch

    env = lmdb.open(str(root / "BigEarthNetEncoded.lmdb"), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for r in pairs:
            s2 = {b: read_band(str(SAMPLE / "BigEarthNet-S2" / "*" / r["patch_id"] / f"{r['patch_id']}_{b}.tif")) for b in S2_ALL}
            s1 = {b: read_band(str(SAMPLE / "BigEarthNet-S1" / "*" / r["s1_name"] / f"{r['s1_name']}_{b}.tif")) for b in ("VH", "VV")}
            patch = BigEarthNet_S1_S2_Patch.short_init(**s1, **s2, labels=list(r["labels"]), new_labels=list(r["labels"]))
            txn.put(r["patch_id"].encode(), patch.dumps())
    env.close()
    with open(root / "test.csv", "w", newline="") as f:
        csv.writer(f).writerows([[r["patch_id"]] for r in pairs])


def build_backbone():
    import torch
    from torch import nn

    from src.csmae_backbone import CSMAEBackbone

    torch.manual_seed(SEED)
    model = CSMAEBackbone(norm_layer=partial(nn.LayerNorm, eps=1e-6), **BACKBONE_KWARGS)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(1.0 + 0.5 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
    return model.eval()


def save_checkpoint(model, out: Path) -> None:
    import torch
    import yaml

    gen = torch.Generator().manual_seed(SEED + 2)
    state = {f"backbone.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    # CSMAE's "specific" decoders (src/csmae.py configure_decoders), as small stand-ins: a real
    # checkpoint has them beside the backbone, and the importer reads the decoding strategy off them
    for name, chans in (("decoder_s1_to_s2", 10), ("decoder_s2_to_s1", 2)):
        state[f"{name}.decoder_embed.weight"] = torch.randn(16, 48, generator=gen)
        state[f"{name}.decoder_pred.weight"] = torch.randn(15 * 15 * chans, 16, generator=gen)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, out / "weights.ckpt")
    (out / "cfg.yaml").write_text(yaml.safe_dump({"kwargs": BACKBONE_KWARGS}, sort_keys=False))


def csmae_embeddings(data_root: Path) -> tuple[list[str], np.ndarray, np.ndarray, object]:
    import torch
    from torch.utils.data import DataLoader

    from src.augmentations import FullTransformPipeline, NCropAugmentation, build_transform_pipeline
    from src.bigearthnet_dataset.BEN_DataModule_LMDB_Encoder import BENDataSet

    aug = SimpleNamespace(rrc=SimpleNamespace(enabled=False), horizontal_flip=SimpleNamespace(prob=0.0),
                          vertical_flip=SimpleNamespace(prob=0.0), crop_size=120, num_crops=1)
    cfg = SimpleNamespace(data=SimpleNamespace(num_bands=12))
    transform = FullTransformPipeline([NCropAugmentation(build_transform_pipeline("ben", aug, cfg), aug.num_crops)])
    dataset = BENDataSet(transform=transform, root_dir=str(data_root), split_dir=str(data_root), split="test",
                         img_size=(12, 120, 120))
    model = build_backbone()
    s1, s2 = [], []
    with torch.no_grad():
        for _, x, _ in DataLoader(dataset, batch_size=8, shuffle=False):
            out = model(x[0])
            s1.append(out["s1"].numpy())
            s2.append(out["s2"].numpy())
    return list(dataset.patches), np.concatenate(s1), np.concatenate(s2), model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csmae", type=Path, required=True, help="a checkout of github.com/jakhac/CSMAE")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "csmae")
    args = ap.parse_args()
    np.float = float  # CSMAE's src/pos_encoding.py uses the alias NumPy 1.24 removed
    sys.path.insert(0, str(args.csmae.resolve()))
    import tempfile

    import timm
    import torch
    import torchvision

    args.out.mkdir(parents=True, exist_ok=True)
    pairs = sample_pairs()
    with tempfile.TemporaryDirectory() as tmp:
        write_lmdb(Path(tmp), pairs)
        s2_ids, s1, s2, model = csmae_embeddings(Path(tmp))
    s1_of = {r["patch_id"]: r["s1_name"] for r in pairs}
    save_checkpoint(model, args.out)
    np.savez(args.out / "golden.npz", s2_ids=np.array(s2_ids), s1_ids=np.array([s1_of[i] for i in s2_ids]),
             s1=s1.astype(np.float32), s2=s2.astype(np.float32))
    commit = subprocess.run(["git", "-C", str(args.csmae), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (args.out / "golden.json").write_text(json.dumps({
        "what": "CSMAE backbone embeddings (out['s1'], out['s2']) of the bundled sample's 24 pairs, by CSMAE's own code",
        "csmae_commit": commit or "(not a git checkout)",
        "backbone_kwargs": BACKBONE_KWARGS, "layer_norm_eps": 1e-6, "seed": SEED,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, "numpy": np.__version__},
        "command": "python tools/golden/make_csmae_golden.py --csmae <CSMAE checkout> --out tests/data/csmae",
    }, indent=2) + "\n")
    print(f"{len(s2_ids)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
