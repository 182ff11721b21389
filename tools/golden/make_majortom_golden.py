"""Golden values from Major TOM's own code (ESA-PhiLab/Major-TOM): grid cells and fragment windows.

What it runs, from a Major TOM checkout (`--majortom`; read, never copied into rsretrieve):
- `MajorTOM/grid.py` `Grid(10)` (the Core datasets' grid) and its `latlon2rowcol(lats, lons,
  integer=True)` on 10,000 points drawn uniformly over the sphere within the grid's latitudes
  (seed 0), plus hand-picked points: the antimeridian (lon -180, -179.99, 179.99), rows with an odd
  column count, grid lines (lat 0, lon 0), the first and last rows;
- `MajorTOM/embedder/grid_cell_fragment.py` `fragment_fn(img, F, 0.1, border_shift=True,
  return_indices=True)` on a 1068 x 1068 cell for fragment sizes 120, 224 and 384: the window
  offsets its embedding datasets use. For 224 and 384 the windows fit exactly and that call runs.
  For 120 its border shift fails in that code (it unfolds an unpermuted (H, W, C) slice: "shape
  ... is invalid"), so the offsets come from `border_shift=False` with the last row and column
  moved to 1068 - F, which is what its `return_indices` branch writes for a shifted border.

Writes `tests/data/majortom/grid_golden.npz` (lats, lons, rows, cols as signed integers) and
`fragments_golden.json`, with `golden.json` saying what ran.

Environment (a venv of its own):

    .venv-golden/bin/pip install numpy pandas geopandas shapely tqdm torch pyproj rasterio matplotlib
    .venv-golden/bin/python tools/golden/make_majortom_golden.py --majortom /path/to/Major-TOM
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SEED = 0
N_POINTS = 10_000


def sample_points(grid) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    low, top = grid.lats[0], grid.lats[-1] + (grid.lats[-1] - grid.lats[-2])
    # uniform on the sphere between the grid's lowest and highest latitude
    z = rng.uniform(np.sin(np.radians(low)), np.sin(np.radians(top)), N_POINTS)
    lats = np.degrees(np.arcsin(z))
    lons = rng.uniform(-180, 180, N_POINTS)
    lats = np.clip(lats, np.nextafter(low, 90), top)
    extra = [(59.8058, -179.9813), (59.8058, -180.0), (59.8058, 179.99), (0.0, 0.0), (0.0, -180.0),
             (0.05, 179.999), (-0.05, -179.999), (40.85, 14.27), (84.99, 10.0), (-84.96, -10.0),
             (60.0, -179.9999), (60.0, 179.9999), (-60.0, -179.95), (45.0, 0.0), (-45.0, 0.0)]
    return np.concatenate([lats, [p[0] for p in extra]]), np.concatenate([lons, [p[1] for p in extra]])


def load_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--majortom", type=Path, required=True, help="a checkout of github.com/ESA-PhiLab/Major-TOM")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "majortom")
    args = ap.parse_args()
    import torch

    # the two modules alone: the packages' __init__ files import the embedding models (open_clip, ...)
    fragment_fn = load_module(args.majortom / "MajorTOM" / "embedder" / "grid_cell_fragment.py").fragment_fn
    Grid = load_module(args.majortom / "MajorTOM" / "grid.py").Grid

    args.out.mkdir(parents=True, exist_ok=True)
    grid = Grid(10)
    lats, lons = sample_points(grid)
    rows, cols = grid.latlon2rowcol(lats, lons, integer=True)
    np.savez(args.out / "grid_golden.npz", lats=lats, lons=lons, rows=np.array(rows, np.int64), cols=np.array(cols, np.int64))

    fragments = {}
    notes = {}
    for size in (120, 224, 384):
        img = torch.zeros(1068, 1068, 3)
        try:
            _, offsets = fragment_fn(img, size, 0.1, border_shift=True, return_indices=True)
            notes[str(size)] = "fragment_fn(border_shift=True)"
        except RuntimeError as exc:
            _, offsets = fragment_fn(img, size, 0.1, border_shift=False, return_indices=True)
            offsets[-1, :, 0] = 1068 - size
            offsets[:, -1, 1] = 1068 - size
            notes[str(size)] = f"fragment_fn(border_shift=False), last row/col at 1068 - F (border_shift=True fails: {exc})"
        fragments[str(size)] = offsets.reshape(-1, 2).int().tolist()  # (row offset, col offset) per window
    (args.out / "fragments_golden.json").write_text(json.dumps({"tile": 1068, "overlap": 0.1, "offsets": fragments, "how": notes}) + "\n")

    commit = subprocess.run(["git", "-C", str(args.majortom), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (args.out / "golden.json").write_text(json.dumps({
        "what": "Major TOM Grid(10).latlon2rowcol(integer=True) of random and edge points; fragment_fn window offsets",
        "majortom_commit": commit or "(not a git checkout)", "seed": SEED, "points": int(lats.size),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "command": "python tools/golden/make_majortom_golden.py --majortom <Major-TOM checkout>",
    }, indent=2) + "\n")
    print(f"{lats.size} points, fragments for {list(fragments)} -> {args.out}")


if __name__ == "__main__":
    main()
