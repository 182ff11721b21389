"""tests/data/rico_hdl: an LMDB that rico-hdl itself wrote, beside the release GeoTIFFs it encoded.

From kai-tub/rico-hdl (MIT; `--rico-hdl`: a checkout or a bare git directory), `integration_tests/`,
copied byte for byte:
- `BigEarthNet_LMDB/data.mdb` -> `BigEarthNet-V2-LMDB/data.mdb`: rico-hdl's encoding of the two
  patches below (key = patch folder name, value = safetensors band -> 2-D array), the reference its
  own integration test checks its encoder against;
- `tiffs/BigEarthNet/BigEarthNet-S1/...` and `.../BigEarthNet-S2/...`: the real BigEarthNet-v2
  release GeoTIFFs it encoded (tile 33UUP, 2017-06-13): one S2 patch (12 bands) and one S1 patch.

Written here: `metadata.parquet`, one row in the release's schema so that rsretrieve's BENv2 reader
can list the two. The fixture's S1 patch is not the S2 patch's pair (70_48 and 75_43): the row
joins them anyway, and its labels and split are placeholders; the test reads pixels only.
BigEarthNet is released under CDLA-Permissive-1.0 (cite: Clasen et al., reBEN, 2024).

    python tools/golden/make_rico_hdl_lmdb.py --rico-hdl /path/to/rico-hdl --out tests/data/rico_hdl
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

S2 = "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_75_43"
S1 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_70_48"
FILES = {
    "integration_tests/BigEarthNet_LMDB/data.mdb": "BigEarthNet-V2-LMDB/data.mdb",
}
TIFFS = "integration_tests/tiffs/BigEarthNet/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rico-hdl", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    repo = args.rico_hdl.resolve()
    git = ["git", "--git-dir", str(repo / ".git" if (repo / ".git").exists() else repo)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    listed = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD", TIFFS], capture_output=True, text=True, check=True).stdout.split()
    files = dict(FILES)
    files.update({p: p[len(TIFFS):] for p in listed if p.startswith(TIFFS + "BigEarthNet-S")})
    for source, target in sorted(files.items()):
        out = args.out / target
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(subprocess.run([*git, "show", f"{commit}:{source}"], capture_output=True, check=True).stdout)
    pq.write_table(pa.table({
        "patch_id": [S2], "labels": [["Coniferous forest"]], "split": ["test"], "country": ["Austria"],
        "s1_name": [S1], "s2v1_name": [S2],  # placeholder: the v1 name is not in the fixture
        "contains_seasonal_snow": [False], "contains_cloud_or_shadow": [False],
    }), args.out / "metadata.parquet")
    (args.out / "SOURCE.json").write_text(json.dumps({
        "rico_hdl_commit": commit, "files": files, "licence": "rico-hdl: MIT; BigEarthNet: CDLA-Permissive-1.0",
        "metadata.parquet": "written by this script: one row joining the two patches (not a real pair); labels, split, s2v1_name are placeholders",
        "command": "python tools/golden/make_rico_hdl_lmdb.py --rico-hdl <rico-hdl> --out tests/data/rico_hdl",
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
