"""Major TOM windows at odd offsets get the model's own upsampling of the 20 m bands (issue 22, item 6).

The cell is a 540 px Major TOM tile made of the bundled sample's real S2 tiles (its own tiles are
120 px: one window each), written as a Core-S2L2A shard and read by the Major TOM reader, whose
default fragmenter cuts it at 0, 105, 210, 315, 420: odd windows, even ones, and odd ones on the
cell's edges. The reference for an odd window is the whole cell upsampled with F.interpolate (the
model's method) and cut at the window; for an even one, its own 20 m crop upsampled (BigEarthNet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from rasterio.transform import from_origin

from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.datasets.majortom import TileRaster
from rsretrieve.models import load_model
from rsretrieve.models.inference import embed_raw
from rsretrieve.models.preprocessing import prepare
from rsretrieve.pixels import RawPixels
from rsretrieve.recipes import BENV2_NEAREST, CSMAE_BEN1
from rsretrieve.provenance import upsampling_differences

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
CELL = 540  # 10 m px; windows at 0, 105, 210, 315, 420 (Major TOM's fragmenter)
CSMAE_CKPT = Path(__file__).resolve().parent / "data" / "csmae" / "weights.ckpt"
MODES = {"bicubic-align-corners": {"mode": "bicubic", "align_corners": True}, "nearest": {"mode": "nearest"}}


@pytest.fixture(scope="module")
def cell(tmp_path_factory):
    """(root of a Core-S2L2A collection with one 540 px tile, fine (4, 540, 540), coarse (6, 270, 270),
    fine bands, coarse bands): a mosaic of the bundled sample's 24 real tiles."""
    from test_readers import _tiff

    sample = open_dataset("majortom", sample_root() / "majortom")
    raw = RawPixels.concat([sample.read_chunk(chunk).pixels for chunk in sample.chunks("s2")])
    n = -(-CELL // 120)
    order = np.arange(n * n) % len(raw)
    fine = np.block([[raw.fine[order[i * n + j]] for j in range(n)] for i in range(n)])[:, :CELL, :CELL]
    coarse = np.block([[raw.coarse[order[i * n + j]] for j in range(n)] for i in range(n)])[:, : CELL // 2, : CELL // 2]
    root = tmp_path_factory.mktemp("mt540")
    (root / "Core-S2L2A" / "images").mkdir(parents=True)
    row = {"product_id": ["P"], "grid_cell": ["539U_97R"], "timestamp": ["2017-06-13 10:10:31"]}
    for bands, data, size in ((raw.fine_bands, fine, 10), (raw.coarse_bands, coarse, 20)):
        for name, band in zip(bands, data):
            row[name] = [_tiff(np.ascontiguousarray(band), from_origin(400000, 4520000, size, size), "EPSG:32633", 0)]
    pq.write_table(pa.table(row), root / "Core-S2L2A" / "images" / "part_00001.parquet")
    return root, fine, coarse, raw.fine_bands, raw.coarse_bands


def read_cell(root: Path) -> tuple[RawPixels, list[tuple[int, int]]]:
    ds = open_dataset("majortom", root)
    (chunk,) = ds.chunks("s2")
    batch = ds.read_chunk(chunk)
    assert not batch.skipped
    return batch.pixels, [(r, c) for r, c, _, _ in batch.meta.column("window").to_pylist()]


def reference(fine, coarse, fine_bands, coarse_bands, wins, method: str) -> RawPixels:
    """Each window as the model would see it with its 20 m bands upsampled by `method` over the
    whole cell (odd windows) or over its own 20 m crop (even windows, as a BigEarthNet patch):
    every band already on the 10 m grid, so the preprocessing upsamples nothing."""
    whole = F.interpolate(torch.from_numpy(coarse.astype(np.float32))[None], size=fine.shape[-2:], **MODES[method])[0].numpy()
    out = []
    for r, c in wins:
        if r % 2 == 0 and c % 2 == 0:
            crop = torch.from_numpy(coarse[:, r // 2 : r // 2 + 60, c // 2 : c // 2 + 60].astype(np.float32))[None]
            up = F.interpolate(crop, size=(120, 120), **MODES[method])[0].numpy()
        else:
            up = whole[:, r : r + 120, c : c + 120]
        out.append(np.concatenate([fine[:, r : r + 120, c : c + 120].astype(np.float32), up]))
    return RawPixels(np.stack(out), fine_bands + coarse_bands)


@pytest.mark.parametrize("preprocessing", [CSMAE_BEN1, BENV2_NEAREST], ids=lambda p: p.name)
def test_odd_windows_get_the_models_upsampling_of_the_whole_cell(cell, preprocessing):
    """The acceptance test: what the encoder's preprocessing makes of a Major TOM window equals the
    model's preprocessing of the cell upsampled whole (F.interpolate) and cut at the window, for odd
    windows in the cell and on its edges; even windows keep the BigEarthNet path, bit for bit."""
    root, fine, coarse, fine_bands, coarse_bands = cell
    raw, wins = read_cell(root)
    odd = np.array([r % 2 == 1 or c % 2 == 1 for r, c in wins])
    assert len(wins) == 25 and odd.sum() == 16 and {(0, 105), (105, 0), (420, 315), (315, 420)} <= set(wins)
    assert raw.coarse_cell is not None and raw.coarse.shape[-1] < 120  # raw 20 m blocks, never an upsampled cell
    got = prepare(raw, "s2", preprocessing, 120).numpy()
    want = prepare(reference(fine, coarse, fine_bands, coarse_bands, wins, preprocessing.upsample), "s2", preprocessing, 120).numpy()
    if preprocessing.upsample == "nearest":
        np.testing.assert_array_equal(got, want)  # pixel repetition, at the window's phase in the cell
    else:
        np.testing.assert_allclose(got[odd], want[odd], rtol=1e-5, atol=1e-5)
        assert np.abs(got[odd] - want[odd]).max() < 1e-4
    even = [i for i in range(len(wins)) if not odd[i]]
    (r, c), i = wins[even[-1]], even[-1]
    native = RawPixels(raw.fine[i : i + 1], fine_bands, coarse[None, :, r // 2 : r // 2 + 60, c // 2 : c // 2 + 60], coarse_bands)
    np.testing.assert_array_equal(got[i : i + 1], prepare(native, "s2", preprocessing, 120).numpy())  # the BigEarthNet path, unchanged


@pytest.mark.parametrize("method", list(MODES))
def test_windows_next_to_the_cells_border(cell, method):
    """Odd windows one pixel from each border (the kernel's taps clamp at the cell's edge, the block
    moves into the cell), cut by the reader's own TileRaster.cut."""
    _, fine, coarse, fine_bands, coarse_bands = cell
    last = CELL - 121
    wins = [(1, 1), (1, last), (last, 1), (last, last), (last, CELL - 120), (CELL - 120, 1), (0, 0)]
    raster = TileRaster(fine, fine_bands, coarse, coarse_bands, np.zeros((CELL, CELL), bool))
    raw = raster.cut([(r, c, 120, 120) for r, c in wins])
    preprocessing = CSMAE_BEN1 if method != "nearest" else BENV2_NEAREST
    got = prepare(raw, "s2", preprocessing, 120).numpy()
    want = prepare(reference(fine, coarse, fine_bands, coarse_bands, wins, method), "s2", preprocessing, 120).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the reference view (`stacked`) is the whole cell's nearest upsampling, cut at each window
    whole = coarse.repeat(2, axis=1).repeat(2, axis=2)
    for i, (r, c) in enumerate(wins[:-1]):
        np.testing.assert_array_equal(raw.stacked(coarse_bands)[i], whole[:, r : r + 120, c : c + 120])


def test_the_reader_no_longer_upsamples_odd_windows_nearest(cell):
    """What the reader shipped before (odd windows: 20 m bands nearest-upsampled on the reader, so
    CSMAE got nearest) is far from CSMAE's own bicubic upsampling; what it ships now is not."""
    root, fine, coarse, fine_bands, coarse_bands = cell
    raw, wins = read_cell(root)
    assert raw.coarse is not None and raw.coarse_cell is not None  # before: coarse None, 10 bands on the 10 m grid
    odd = np.array([r % 2 == 1 or c % 2 == 1 for r, c in wins])
    old = RawPixels(raw.stacked(), raw.bands)  # exactly the reader's former nearest upsampling
    want = prepare(reference(fine, coarse, fine_bands, coarse_bands, wins, "bicubic-align-corners"), "s2", CSMAE_BEN1, 120).numpy()
    before = np.abs(prepare(old, "s2", CSMAE_BEN1, 120).numpy()[odd] - want[odd]).max()
    now = np.abs(prepare(raw, "s2", CSMAE_BEN1, 120).numpy()[odd] - want[odd]).max()
    assert before > 0.1 and now < 1e-4, (before, now)


def test_csmae_embeds_major_tom_windows_as_the_whole_cell_upsampled(cell):
    """End to end with CSMAE's checkpoint (tests/data/csmae) through `embed_raw`, in batches that mix
    odd and even windows (7 does not divide 25): the embeddings of the reference input."""
    root, fine, coarse, fine_bands, coarse_bands = cell
    raw, wins = read_cell(root)
    model = load_model(str(CSMAE_CKPT))
    assert model.config.preprocessing.upsample == "bicubic-align-corners"
    got = embed_raw(model, raw, "s2", "cpu", batch_size=7)
    want = embed_raw(model, reference(fine, coarse, fine_bands, coarse_bands, wins, "bicubic-align-corners"), "s2", "cpu", batch_size=7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_raw_pixels_with_cells_concatenate_take_and_check(cell):
    """Plain batches (windows on the 20 m grid) and cut ones concatenate (the plain patches become
    their own cells); a block that cannot hold its window's taps is refused."""
    _, fine, coarse, fine_bands, coarse_bands = cell
    raster = TileRaster(fine, fine_bands, coarse, coarse_bands, np.zeros((CELL, CELL), bool))
    plain, cut = raster.cut([(0, 0, 120, 120), (210, 420, 120, 120)]), raster.cut([(105, 315, 120, 120)])
    assert plain.coarse_cell is None and plain.coarse.shape[-1] == 60
    both = RawPixels.concat([plain, cut])
    assert both.coarse.shape == (3, 6, 66, 66) and both.coarse_cell[:2].tolist() == [[60, 60, 0, 0, 0, 0]] * 2
    for preprocessing in (CSMAE_BEN1, BENV2_NEAREST):
        joined = prepare(both, "s2", preprocessing, 120)
        assert torch.equal(joined[:2], prepare(plain, "s2", preprocessing, 120))
        assert torch.equal(joined[2:], prepare(both.take([2]), "s2", preprocessing, 120))
    np.testing.assert_array_equal(both.stacked()[:2], plain.stacked())
    bad = cut.coarse_cell.copy()
    bad[0, 4] += 3  # the block said to start 3 px lower than it does: its first rows are missing
    with pytest.raises(ValueError, match="does not fit its cell"):
        RawPixels(cut.fine, fine_bands, cut.coarse, coarse_bands, bad)


def test_old_major_tom_stores_differ_for_a_bicubic_model_only():
    """Stores written when the reader nearest-upsampled odd windows (no `coarse` in the reader's
    record) are other embeddings for CSMAE; for a nearest model (CSMoE) they are the same."""
    old = {"dataset": {"reader": {"windows": "majortom", "patch_size": 120, "overlap": 0.1}}}
    new_reader = open_dataset("majortom", sample_root() / "majortom").describe()
    for preprocessing, expected in ((CSMAE_BEN1, ["reader.coarse"]), (BENV2_NEAREST, [])):
        asked = {"dataset": {"reader": new_reader}, "preprocessing": preprocessing.to_dict()}
        assert upsampling_differences(old, asked) == expected
        assert upsampling_differences(asked, asked) == []
    grid = {"dataset": {"reader": {"windows": "grid", "patch_size": 120, "overlap": 0.0}}}
    asked = {"dataset": {"reader": new_reader}, "preprocessing": CSMAE_BEN1.to_dict()}
    assert upsampling_differences(grid, asked) == [] and upsampling_differences({"dataset": {"name": "benv2"}}, asked) == []
