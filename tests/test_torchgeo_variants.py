"""BigEarthNet-v2 patches as TorchGeo's BigEarthNetV2 test fixture writes them, which TorchGeo reads:
S1 as int16, and the 20 m bands at the 10 m size (120 x 120 px instead of 60 x 60). The readers
encode them (converted, and counted in the encode summary) instead of skipping them, and a 20 m
band delivered at 120 px is never upsampled a second time. Test data: copies of the real sample's
patches, rewritten in a tmp dir."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from rsretrieve.bands import S2_COARSE
from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.datasets.benv2_patch import AT_10M, DECIMATED, S1_INTEGER
from rsretrieve.datasets.tile import read_tile
from test_cli import MODEL, run

ROOT = sample_root()
N_PAIRS = 24  # with the snow/cloud patches


def tree_copy(path: Path) -> Path:
    shutil.copytree(ROOT, path, ignore=shutil.ignore_patterns("majortom"))
    return path


def rewrite(path: Path, data: np.ndarray, scale: float = 1.0) -> None:
    """`path` again with `data` (its dtype and size), the pixel size divided by `scale`."""
    with rasterio.open(path) as src:
        profile = src.profile
    t = profile["transform"]
    profile.update(dtype=data.dtype.name, width=data.shape[1], height=data.shape[0], blockxsize=None, blockysize=None, tiled=False,
                   transform=Affine(t.a / scale, t.b, t.c, t.d, t.e / scale, t.f))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)


def s1_as_int16(root: Path) -> None:
    """Every S1 band as int16 dB (rounded), as TorchGeo's fixture has it."""
    for path in root.glob("BigEarthNet-S1/*/*/*_V[VH].tif"):
        with rasterio.open(path) as src:
            rewrite(path, np.round(src.read(1)).astype(np.int16))


def upsampled(band: np.ndarray) -> np.ndarray:
    return band.repeat(2, axis=0).repeat(2, axis=1)


def s2_20m_at_120(root: Path, exact: bool, folders=None) -> None:
    """The 20 m bands of the S2 patch `folders` (default all) at 120 px: their nearest upsampling,
    exactly (`exact`), or with one pixel of each 2 x 2 block raised by 1 (on the 10 m grid, not a
    copy of a 60 px band: TorchGeo's fixture is random at 120 px)."""
    for folder in folders or sorted(p for p in root.glob("BigEarthNet-S2/*/*") if p.is_dir()):
        for band in S2_COARSE:
            path = folder / f"{folder.name}_{band}.tif"
            with rasterio.open(path) as src:
                big = upsampled(src.read(1))
            if not exact:
                big[::2, ::2] += 1
            rewrite(path, big, scale=2.0)


def read_all(root: Path, modality: str):
    ds = open_dataset("benv2", root, include_snow_cloud=True)
    batches = [ds.read_chunk(c) for c in ds.chunks(modality)]
    return ds, batches


def test_int16_s1_is_read_as_float32_with_unchanged_values(tmp_path):
    root = tree_copy(tmp_path / "benv2")
    s1_as_int16(root)
    original, _ = read_all(ROOT, "s1")
    ds, batches = read_all(root, "s1")
    assert sum(len(b.skipped) for b in batches) == 0 and sum(len(b) for b in batches) == N_PAIRS
    converted = [c for b in batches for c in b.converted]
    assert len(converted) == N_PAIRS and {what for _, what in converted} == {S1_INTEGER}
    for batch in batches:
        assert batch.pixels.fine.dtype == np.float32
        for i, name in enumerate(batch.patch_ids):
            theirs = np.round(original.read_patch(name, "s1").fine[0])
            np.testing.assert_array_equal(batch.pixels.fine[i], theirs)
    # the query path reads such a patch folder too
    folder = next(p for p in root.glob("BigEarthNet-S1/*/*") if p.is_dir())
    tile = read_tile(folder)
    assert tile.modality == "s1" and tile.pixels.fine.dtype == np.float32
    np.testing.assert_array_equal(tile.pixels.fine[0], np.round(original.read_patch(folder.name, "s1").fine[0]))


def read_20m_at_120(tmp_path, exact: bool, conversion: str):
    """(the release sample's S2 reader, the batches of a copy whose 20 m bands are at 120 px, the
    copy's root), every patch read (none skipped) and each converted as `conversion` says."""
    root = tree_copy(tmp_path / "benv2")
    s2_20m_at_120(root, exact=exact)
    original, _ = read_all(ROOT, "s2")
    _, batches = read_all(root, "s2")
    assert sum(len(b.skipped) for b in batches) == 0 and sum(len(b) for b in batches) == N_PAIRS
    assert {what for b in batches for _, what in b.converted} == {conversion}
    return original, batches, root


def test_20m_bands_that_are_nearest_upsampled_give_the_release_patch_and_model_input(tmp_path):
    """A 120 px band that is exactly the nearest upsampling of the 60 px band: taken back to 60 px,
    the raw pixels and what the model sees (both registered preprocessings) equal the release's."""
    torch = pytest.importorskip("torch")
    from rsretrieve.models.preprocessing import prepare
    from rsretrieve.pixels import RawPixels
    from rsretrieve.recipes import BENV2_NEAREST, CSMAE_BEN1

    original, batches, _ = read_20m_at_120(tmp_path, exact=True, conversion=DECIMATED)
    names = batches[0].patch_ids[:4]
    ours = batches[0].pixels.take(slice(0, 4))
    theirs = RawPixels.concat([original.read_patch(n, "s2") for n in names])
    assert ours.coarse.shape[-1] == 60
    np.testing.assert_array_equal(ours.fine, theirs.fine)
    np.testing.assert_array_equal(ours.coarse, theirs.coarse)
    for preprocessing in (BENV2_NEAREST, CSMAE_BEN1):
        assert torch.equal(prepare(ours, "s2", preprocessing, 128), prepare(theirs, "s2", preprocessing, 128))


def test_20m_bands_on_the_10m_grid_are_not_upsampled_again(tmp_path):
    """20 m bands at 120 px that are no copy of a 60 px band ship at 120 px with the 10 m bands:
    the model's input holds them as they are (normalised), no second upsampling; and had the
    reader shipped a nearest-upsampled band that way, the model would see what it sees for the
    60 px band."""
    torch = pytest.importorskip("torch")
    from rsretrieve.models.preprocessing import prepare
    from rsretrieve.pixels import RawPixels
    from rsretrieve.recipes import BENV2_NEAREST

    original, batches, root = read_20m_at_120(tmp_path, exact=False, conversion=AT_10M)
    raw = batches[0].pixels
    assert raw.coarse is None and set(S2_COARSE) <= set(raw.fine_bands)
    name = batches[0].patch_ids[0]
    release = original.read_patch(name, "s2")
    expected = upsampled(release.band("B05")[0])
    expected[::2, ::2] += 1
    np.testing.assert_array_equal(raw.band("B05")[0], expected)  # as written, at 120 px
    x = prepare(raw.take([0]), "s2", BENV2_NEAREST, 120)  # 120 px input: no resize
    mean, std = dict((b, (m, s)) for b, m, s in BENV2_NEAREST.stats)["B05"]
    channel = BENV2_NEAREST.s2_bands.index("B05")
    torch.testing.assert_close(x[0, channel], torch.from_numpy((expected.astype(np.float32) - np.float32(mean)) / np.float32(std)))
    # the 10 m grid path with a band that is exactly the nearest upsampling: the same model input
    on_grid = RawPixels(np.concatenate([release.fine, release.stacked(S2_COARSE).astype(np.uint16)], axis=1),
                        release.fine_bands + S2_COARSE)
    assert torch.equal(prepare(on_grid, "s2", BENV2_NEAREST, 128), prepare(release, "s2", BENV2_NEAREST, 128))
    # the query path: the patch folder reads the same pixels
    folder = next(p for p in root.glob(f"BigEarthNet-S2/*/{name}"))
    np.testing.assert_array_equal(read_tile(folder).pixels.band("B05")[0], expected)


def test_one_chunk_holds_one_layout(tmp_path):
    """Patches with 20 m bands on the 10 m grid beside release patches in one chunk: the release's
    are kept, the others named in `skipped` (a batch holds one band layout)."""
    root = tree_copy(tmp_path / "benv2")
    folders = sorted(p for p in root.glob("BigEarthNet-S2/*/*") if p.is_dir())
    s2_20m_at_120(root, exact=False, folders=folders[:2])
    _, batches = read_all(root, "s2")
    skipped = [s for b in batches for s in b.skipped]
    assert sorted(name for name, _ in skipped) == sorted(f.name for f in folders[:2])
    assert all("one layout per chunk" in why and name in why for name, why in skipped)
    assert sum(len(b) for b in batches) == N_PAIRS - 2


def test_torchgeo_fixture_layout_is_encoded_with_the_conversions_in_the_summary(tmp_path):
    """Both at once, as in TorchGeo's fixture: `rsretrieve encode` encodes every patch (none
    skipped) and its summary counts the conversions."""
    root = tree_copy(tmp_path / "benv2")
    s1_as_int16(root)
    s2_20m_at_120(root, exact=False)
    proc = run(["encode", "--dataset", "benv2", "--data-root", root, "--model", MODEL], tmp_path / "ws")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "S1: encoded 18 patches" in out and "S2: encoded 18 patches" in out and "skipped" not in out
    assert f"converted on reading: 18 patches: {S1_INTEGER}" in out
    assert f"converted on reading: 18 patches: {AT_10M}" in out


@pytest.mark.filterwarnings("ignore:model 'csmoe-tiny' has RANDOM weights")
def test_chunks_of_both_layouts_in_one_encoder_task(tmp_path):
    """One encoder task gets a chunk whose 20 m bands came on the 10 m grid and chunks of release
    patches: each layout is embedded as a batch of its own, every patch gets its vector."""
    from rsretrieve.indexer.encoder import EncoderSpec, encode_group
    from rsretrieve.models.checkpoint import load_model
    from rsretrieve.models.inference import embed_raw

    root = tree_copy(tmp_path / "benv2")
    ds = open_dataset("benv2", root, include_snow_cloud=True, chunk_size=6)
    chunks = ds.chunks("s2")
    s2_20m_at_120(root, exact=False, folders=[next(root.glob(f"BigEarthNet-S2/*/{name}")) for name in chunks[1].patch_ids])
    batches = [ds.read_chunk(c) for c in chunks]
    assert batches[1].pixels.coarse is None and batches[0].pixels.coarse is not None
    results, _ = encode_group(batches, chunks, EncoderSpec(MODEL, "cpu", 8))
    model = load_model(MODEL, device="cpu")
    for batch, result in zip(batches, results):
        assert result.patch_ids == batch.patch_ids and len(result.patch_ids) == 6
        np.testing.assert_allclose(result.embeddings, embed_raw(model, batch.pixels, "s2", "cpu", 8), atol=1e-5)
    assert [len(r.converted) for r in results] == [0, 6, 0, 0]
