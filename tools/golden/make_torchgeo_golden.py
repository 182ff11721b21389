"""What TorchGeo's BigEarthNet-v2 loader reads from the bundled sample (the official release layout).

Runs `torchgeo.datasets.BigEarthNetV2` (torchgeo 0.8.1) on `rsretrieve/data/sample` for every split
and keeps, per patch, `_load_image(i, "s1")` (the 18 pairs of metadata.parquet) and the 10 m
bands of `_load_image(i, "s2")` (the first 6 test patches): the arrays its `__getitem__` returns as `image`. TorchGeo finds the S1 folder as
`BigEarthNet-S1/<s1_name minus _<tile>_<row>_<col>>/<s1_name>/*.tif` and sorts the band files
by name (VH, VV); it reads every band with `out_dtype="int32"` and bilinear resampling to 120 px,
so its S1 values are dB rounded to integers and its 20 m S2 bands are bilinear, not nearest.

Its `_verify` wants a `Reference_Maps/` folder, which the sample does not have (no reference maps
are shipped); the script runs it on a temporary folder that links the sample's folders and files
and holds an empty `Reference_Maps/`. `_load_image` never opens it.

    .venv-golden/bin/pip install torchgeo==0.8.1
    .venv-golden/bin/python tools/golden/make_torchgeo_golden.py
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "rsretrieve" / "data" / "sample"
OUT = REPO / "tests" / "data" / "torchgeo"


def main() -> None:
    import torchgeo
    from torchgeo.datasets import BigEarthNetV2

    OUT.mkdir(parents=True, exist_ok=True)
    s1_ids, s1, s2_ids, s2 = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("BigEarthNet-S1", "BigEarthNet-S2", "metadata.parquet"):
            (root / name).symlink_to(SAMPLE / name)
        (root / "Reference_Maps").mkdir()
        for split in ("train", "val", "test"):
            ds = BigEarthNetV2(root=root, split=split, bands="all")
            for i in range(len(ds)):
                s1_ids.append(ds.metadata_df.loc[i, "s1_name"])
                s1.append(ds._load_image(i, "s1").numpy())
                if split == "test" and len(s2_ids) < 6:
                    s2_ids.append(ds.metadata_df.loc[i, "patch_id"])
                    s2.append(ds._load_image(i, "s2").numpy())
    # S2: its 10 m bands only (channels 1, 2, 3, 7 of B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B11 B12),
    # which it reads at native size; the 20 m bands it resamples bilinearly, which no model here uses
    np.savez_compressed(OUT / "torchgeo_golden.npz", s1_ids=np.array(s1_ids), s1=np.stack(s1).astype(np.int16),
                        s2_ids=np.array(s2_ids), s2_10m=np.stack(s2)[:, [1, 2, 3, 7]].astype(np.uint16),
                        s2_10m_bands=np.array(["B02", "B03", "B04", "B08"]))
    (OUT / "golden.json").write_text(json.dumps({
        "what": "torchgeo BigEarthNetV2._load_image of the bundled sample: S1 (channels VH, VV, int32 dB) for every "
                "pair of metadata.parquet, the S2 10 m bands (B02 B03 B04 B08 of its 12) for 6 test patches",
        "versions": {"python": platform.python_version(), "torchgeo": torchgeo.__version__, "numpy": np.__version__},
        "command": "python tools/golden/make_torchgeo_golden.py",
    }, indent=2) + "\n")
    print(f"{len(s1_ids)} S1 and {len(s2_ids)} S2 patches -> {OUT}")


if __name__ == "__main__":
    main()
