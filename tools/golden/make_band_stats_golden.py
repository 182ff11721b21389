"""Per-band statistics as their publishers ship them, for `tests/test_pinned.py`.

Reads two tables from the wheels on PyPI without importing either package (neither is a
dependency of rsretrieve; their modules import torch, pandas, ...): the literals are parsed with
`ast.literal_eval` from the files inside the wheels.

- `configilm==0.7.1`, `configilm/extra/BENv2_utils.py`: `means["120_nearest"]` and
  `stds["120_nearest"]`, BigEarthNet-v2 train split, 20 m bands upsampled with nearest neighbour
  (what CSMoE's `benv2-nearest` preprocessing normalises with);
- `bigearthnet-common==2.8.0`, `bigearthnet_common/constants.py`: `BAND_STATS_S2` and
  `BAND_STATS_S1`, BigEarthNet v1 (what CSMAE's code normalises with, `csmae-ben1`).

    python tools/golden/make_band_stats_golden.py                 # pip download --no-deps into a temp dir
    python tools/golden/make_band_stats_golden.py --wheels /tmp/wheels
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "tests" / "data" / "band_stats" / "golden.json"
SOURCES = {
    "configilm": ("configilm==0.7.1", "configilm-0.7.1-py3-none-any.whl", "configilm/extra/BENv2_utils.py", ("means", "stds")),
    "bigearthnet_common": ("bigearthnet-common==2.8.0", "bigearthnet_common-2.8.0-py3-none-any.whl",
                           "bigearthnet_common/constants.py", ("BAND_STATS_S2", "BAND_STATS_S1")),
}


def literals(source: str, names: tuple[str, ...]) -> dict:
    """The values of the module-level assignments `names` in `source` (literals only)."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                found[node.targets[0].id] = ast.literal_eval(node.value)
    missing = set(names) - set(found)
    if missing:
        raise SystemExit(f"not found: {sorted(missing)}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="a folder holding both wheels (else pip downloads them)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.wheels or Path(tmp)
        record = {"what": "per-band (mean, std) tables as published, parsed from the wheels' source (no import)",
                  "command": "python tools/golden/make_band_stats_golden.py", "sources": {}}
        for key, (requirement, wheel_name, member, names) in SOURCES.items():
            wheel = folder / wheel_name
            if not wheel.exists():
                pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement]
                subprocess.run(pip, check=True)
            with zipfile.ZipFile(wheel) as zf:
                values = literals(zf.read(member).decode(), names)
            record["sources"][key] = {"requirement": requirement, "wheel": wheel_name,
                                      "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "file": member}
            if key == "configilm":
                record["benv2_120_nearest"] = {band: [values["means"]["120_nearest"][band], values["stds"]["120_nearest"][band]]
                                               for band in values["means"]["120_nearest"]}
            else:
                record["ben1"] = {band: [table["mean"][band], table["std"][band]]
                                  for table in (values["BAND_STATS_S2"], values["BAND_STATS_S1"]) for band in table["mean"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)
    OUT.write_text(re.sub(r"\[\s+([^\],]+),\s+([^\]]+?)\s+\]", r"[\1, \2]", text) + "\n")  # a band per line
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
