"""Behaviours pinned to a reference outside rsretrieve (issue 29, finding 8).

Each test compares what rsretrieve does with what another party publishes or documents, never with
rsretrieve's own code:

- per-band statistics: configilm 0.7.1's BENv2 table and bigearthnet-common 2.8.0's v1 table, read
  from their wheels by `tools/golden/make_band_stats_golden.py` (tests/data/band_stats/golden.json);
- S1 linear power -> dB: Major TOM's conversion, `10*np.log10(vv)` (ESA-PhiLab/Major-TOM,
  `MajorTOM/extras/thumbnail_s1rtc.py`, how the Core thumbnails were made), on the real S1RTC cells
  of the bundled sample, decoded with rasterio;
- resizes: Pillow's `Image.resize` (BILINEAR, BICUBIC; torch documents `antialias=True` with
  `align_corners=False` as matching it), the transpose: CSMAE's `np.transpose(img, (2, 1, 0))`
  followed by torchvision `ToTensor` (HWC -> CHW) (jakhac/CSMAE,
  `src/bigearthnet_dataset/BEN_DataModule_LMDB_Encoder.py`);
- nlist: faiss's own k-means limits (`ClusteringParameters.min_points_per_centroid`) and its wiki's
  guideline (`IVF` with about 4*sqrt(N) lists);
- cosine scores: the exact cosine in float64 of the vectors the store holds;
- the write order, a foreign index and a damaged shard index: faults made by hand in a real store.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.io import MemoryFile
from rasterio.transform import from_origin

from rsretrieve.datasets import open_dataset, sample_root
from rsretrieve.datasets.benv2 import band_path
from rsretrieve.datasets.tile import bilinear_resize, read_tile
from rsretrieve.models.preprocessing import prepare, resize_batch
from rsretrieve.pixels import RawPixels
from rsretrieve.recipes import BEN1_STATS, BENV2_NEAREST, BENV2_STATS, CSMAE_BEN1

ROOT = sample_root()
GOLDEN = json.loads((Path(__file__).parent / "data" / "band_stats" / "golden.json").read_text())
S1RTC_SHARD = ROOT / "majortom" / "Core-S1RTC" / "images" / "part_00001.parquet"


# -- 1. per-band statistics ------------------------------------------------------------------------


DECIMALS = {"VV": 4, "VH": 4}  # rsretrieve keeps configilm's S1 values to 4 decimals, S2 values to 3


@pytest.mark.parametrize("band", sorted(BENV2_STATS))
def test_benv2_statistics_are_configilms_120_nearest_table(band):
    """CSMoE's statistics (`benv2-nearest`): configilm's `means/stds["120_nearest"]`, each value
    rounded to the decimals rsretrieve keeps (3 for S2, 4 for S1)."""
    digits = DECIMALS.get(band, 3)
    for ours, published in zip(BENV2_STATS[band], GOLDEN["benv2_120_nearest"][band], strict=True):
        assert round(published, digits) == pytest.approx(ours, abs=1e-9), (band, ours, published)


def test_benv2_nearest_normalises_with_configilms_table_in_its_band_order():
    """What the model is fed with: `benv2-nearest`'s mean/std per channel, in its channel order,
    against configilm's table looked up by band name (as its `band_combi_to_mean_std` does)."""
    table = GOLDEN["benv2_120_nearest"]
    for modality in ("s1", "s2"):
        mean, std = BENV2_NEAREST.mean_std(modality)
        bands = BENV2_NEAREST.bands(modality)
        np.testing.assert_allclose(mean, [table[b][0] for b in bands], rtol=5e-6, err_msg=modality)
        np.testing.assert_allclose(std, [table[b][1] for b in bands], rtol=5e-6, err_msg=modality)
    assert BENV2_NEAREST.upsample == "nearest"  # the table is the one of nearest upsampling


@pytest.mark.parametrize("band", sorted(BEN1_STATS))
def test_ben1_statistics_are_bigearthnet_commons_table_exactly(band):
    assert BEN1_STATS[band] == tuple(GOLDEN["ben1"][band])


def test_csmae_ben1_normalises_with_bigearthnet_commons_table_in_its_band_order():
    table = GOLDEN["ben1"]
    for modality in ("s1", "s2"):
        mean, std = CSMAE_BEN1.mean_std(modality)
        bands = CSMAE_BEN1.bands(modality)
        np.testing.assert_array_equal(mean, np.float32([table[b][0] for b in bands]), err_msg=modality)
        np.testing.assert_array_equal(std, np.float32([table[b][1] for b in bands]), err_msg=modality)


# -- 2. S1 linear power -> dB, Major TOM's conversion ------------------------------------------------


def _s1rtc_cells() -> dict[str, dict[str, np.ndarray]]:
    """{source patch: {"VV": linear, "VH": linear}} of the sample's Core-S1RTC shard, decoded with
    rasterio (not rsretrieve's decoder)."""
    table = pq.read_table(S1RTC_SHARD, columns=["vv", "vh", "source_patch_id"]).to_pylist()
    out = {}
    for row in table:
        bands = {}
        for column in ("vv", "vh"):
            with MemoryFile(row[column]) as memory, memory.open() as ds:
                bands[column.upper()] = ds.read(1)
                assert ds.nodata == -32768.0
        out[row["source_patch_id"]] = bands
    return out


def _major_tom_db(linear: np.ndarray) -> np.ndarray:
    """Major TOM's conversion (thumbnail_s1rtc.py: `vv_dB = 10*np.log10(vv)`), in float64."""
    return 10 * np.log10(linear.astype(np.float64))


@pytest.fixture(scope="module")
def s1rtc():
    cells = _s1rtc_cells()
    assert len(cells) == 24 and all((b["VV"] > 0).all() and (b["VH"] > 0).all() for b in cells.values())
    return cells


def test_majortom_reader_converts_s1rtc_to_db_as_major_tom_does(s1rtc):
    dataset = open_dataset("majortom", ROOT / "majortom")
    seen = 0
    for chunk in dataset.chunks("s1"):
        batch = dataset.read_chunk(chunk)
        for i, source in enumerate(batch.meta.column("source_patch_id").to_pylist()):
            for band in ("VV", "VH"):
                expected = _major_tom_db(s1rtc[source][band]).astype(np.float32)
                np.testing.assert_allclose(batch.pixels.band(band)[i], expected, rtol=0, atol=1e-5, err_msg=(source, band))
            seen += 1
    assert seen == 24


def _write_s1_tile(path: Path, vv: np.ndarray, vh: np.ndarray) -> Path:
    profile = {"driver": "GTiff", "width": vv.shape[1], "height": vv.shape[0], "count": 2, "dtype": "float32",
               "crs": "EPSG:32633", "transform": from_origin(500_000, 5_300_000, 10, 10)}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([vv, vh]).astype(np.float32))
        dst.set_band_description(1, "VV")
        dst.set_band_description(2, "VH")
    return path


@pytest.mark.parametrize("units", ["linear", "auto"])
def test_query_tile_in_linear_power_converts_to_db_as_major_tom_does(s1rtc, tmp_path, units):
    """A 120 px query tile of Major TOM S1RTC values (one patch, cut by `_cut_strip`)."""
    cell = next(iter(s1rtc.values()))
    tile = read_tile(_write_s1_tile(tmp_path / "s1rtc.tif", cell["VV"], cell["VH"]), "s1", s1_units=units)
    assert not tile.resized and len(tile.pixels) == 1
    for band in ("VV", "VH"):
        expected = _major_tom_db(cell[band]).astype(np.float32)
        np.testing.assert_allclose(tile.pixels.band(band)[0], expected, rtol=0, atol=1e-5, err_msg=band)


def _pil_resize(channels: np.ndarray, size: int, resample) -> np.ndarray:
    """(C, H, W) float32 -> (C, size, size) by Pillow, channel by channel (mode "F")."""
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c, np.float32), mode="F").resize((size, size), resample))
                     for c in channels])


def test_small_query_tile_is_converted_to_db_then_resized_as_pillow_bilinear_does(s1rtc, tmp_path):
    """A tile under 120 px (`_small`): Major TOM's dB, then the query-tile resize to 120 px, which
    equals Pillow's bilinear upscaling (half-pixel centres, edge pixels repeated)."""
    cell = next(iter(s1rtc.values()))
    vv, vh = cell["VV"][:45, :70], cell["VH"][:45, :70]
    tile = read_tile(_write_s1_tile(tmp_path / "small.tif", vv, vh), "s1", s1_units="linear")
    assert tile.resized and tile.pixels.fine.shape == (1, 2, 120, 120)
    db = np.stack([_major_tom_db(vv), _major_tom_db(vh)]).astype(np.float32)
    expected = _pil_resize(db, 120, Image.BILINEAR)
    order = [tile.pixels.fine_bands.index(b) for b in ("VV", "VH")]
    np.testing.assert_allclose(tile.pixels.fine[0, order], expected, rtol=0, atol=2e-4)


# -- 3. resizes and the transpose -------------------------------------------------------------------


def _known_image() -> np.ndarray:
    """A real, non-symmetric image: the sample's first S1 patch, (2, 120, 120) dB (VV, VH)."""
    dataset = open_dataset("sample")
    name = dataset.names("s1")[0]
    out = []
    for band in ("VV", "VH"):
        with rasterio.open(band_path(ROOT, name, "s1", band)) as ds:
            out.append(ds.read(1).astype(np.float32))
    return np.stack(out)


def test_query_tile_resize_is_pillows_bilinear_upscaling():
    image = _known_image()[:, :37, :53]
    np.testing.assert_allclose(bilinear_resize(image, 120), _pil_resize(image, 120, Image.BILINEAR), rtol=0, atol=2e-4)


@pytest.mark.parametrize("method,size", [("bilinear", 224), ("bilinear", 64), ("bicubic", 64)])
def test_resize_to_the_models_input_size_is_pillows(method, size):
    """To the model's input size: bilinear up (224 px, CSMoE) and down (64 px), and bicubic down
    (CSMAE's torchvision `Resize(bicubic)`, antialiased), each equal to Pillow's resize — what torch
    documents `F.interpolate(..., align_corners=False, antialias=True)` to match."""
    image = _known_image()
    got = resize_batch(torch.from_numpy(image)[None], size, method)[0].numpy()
    expected = _pil_resize(image, size, {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method])
    assert got.shape == expected.shape == (2, size, size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)  # dB values of -30..10: float32 sums


def _csmae_chw(chw: np.ndarray) -> np.ndarray:
    """CSMAE's dataset and transform: `np.transpose(img, (2, 1, 0))`, then torchvision `ToTensor`,
    which turns an HWC array into CHW (`pic.transpose((2, 0, 1))`)."""
    hwc = np.transpose(chw, (2, 1, 0))
    return np.transpose(hwc, (2, 0, 1))


def _reference_resize(chw: np.ndarray, size: int, method: str) -> np.ndarray:
    """Bilinear (CSMoE's `benv2-nearest`, our choice) and bicubic shrinking as Pillow resizes; bicubic
    enlarging as torchvision 0.11 (CSMAE's environment.yaml) resizes a tensor: `F.interpolate(...,
    mode="bicubic", align_corners=False)`, torch's documented call (Pillow's cubic differs: a=-0.5)."""
    if chw.shape[-1] == size:
        return chw
    if method == "bicubic" and size > chw.shape[-1]:
        return torch.nn.functional.interpolate(torch.from_numpy(chw)[None], size=(size, size), mode="bicubic",
                                               align_corners=False)[0].numpy()
    return _pil_resize(chw, size, {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[method])


@pytest.mark.parametrize("preprocessing,img_size", [(BENV2_NEAREST, 120), (BENV2_NEAREST, 224), (CSMAE_BEN1, 120),
                                                    (CSMAE_BEN1, 64), (CSMAE_BEN1, 224)], ids=lambda v: getattr(v, "name", v))
def test_prepare_orders_normalises_transposes_and_resizes_as_the_references(preprocessing, img_size):
    """The model's input of a real S1 patch: bands in the model's order, normalised by the published
    table, transposed as CSMAE's pipeline does for `csmae-ben1` only (`benv2-nearest` keeps rows as
    rows), then resized to the model's input size by the preprocessing's own method."""
    image = _known_image()  # VV, VH
    by_band = {"VV": image[0], "VH": image[1]}
    table = GOLDEN["ben1" if preprocessing is CSMAE_BEN1 else "benv2_120_nearest"]
    bands = preprocessing.bands("s1")
    chw = np.stack([(by_band[b] - table[b][0]) / table[b][1] for b in bands]).astype(np.float32)
    assert not np.allclose(chw, _csmae_chw(chw), atol=1e-3)  # the image is no symmetric one
    method = "bicubic" if preprocessing is CSMAE_BEN1 else "bilinear"
    expected = _reference_resize(_csmae_chw(chw) if preprocessing is CSMAE_BEN1 else chw, img_size, method)
    got = prepare(RawPixels(image[None], ("VV", "VH")), "s1", preprocessing, img_size)[0].numpy()
    assert got.shape == (2, img_size, img_size)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# -- 5. the default nlist ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 38, 39, 40, 77, 78, 100, 1_000, 10_000, 24_336, 100_000, 1_000_000, 144_000_000])
def test_default_nlist_is_within_faiss_limits(n):
    """faiss's k-means wants `ClusteringParameters().min_points_per_centroid` (39) training points
    per centroid; its wiki ("Guidelines to choose an index") sizes IVF at 4*sqrt(N) lists and more.
    The default is the guideline's 4*sqrt(N) wherever the archive has the points for it, else as
    many lists as it has points for, and never fewer than one."""
    import faiss

    from rsretrieve.retrieval.ivfpq import default_nlist
    from rsretrieve.retrieval.ondisk_ivf import disk_nlist

    per_centroid = faiss.ClusteringParameters().min_points_per_centroid
    guideline = round(4 * np.sqrt(n))
    nlist = default_nlist(n)
    assert nlist == max(1, min(guideline, n // per_centroid)), (n, nlist)
    disk = disk_nlist(n)  # ivfpq-disk: a power of two near 4*sqrt(N), as many as the sample trains
    assert disk >= 1 and disk & (disk - 1) == 0, (n, disk)
    assert disk == 1 or disk * per_centroid <= n, (n, disk)
    assert disk <= 2 * guideline or disk == 1, (n, disk)


# -- 6. the cosine an IVF-PQ index reports -------------------------------------------------------------


def test_ivfpq_scores_are_the_exact_cosines_of_the_rows_it_returns(tmp_path):
    """The in-RAM IVF-PQ (refined with the full vectors) reports, for every id it returns, the
    cosine of the query and that row's stored embedding, computed here in float64."""
    import xarray as xr

    from rsretrieve.retrieval import EmbeddingIndex
    from test_faiss_index import clustered, make_store

    archive = clustered(600, dim=32, sub=8, clusters=16)
    queries = clustered(25, dim=32, sub=8, clusters=16, seed=7)
    make_store(tmp_path / "s.zarr", archive)
    index = EmbeddingIndex.build(xr.open_zarr(tmp_path / "s.zarr", group="s2", consolidated=False), kind="ivfpq",
                                 nlist=8, m=4, tune=False, use_gpu=False)
    assert index.kind == "ivfpq"
    scores, rows = index.search(queries, 10)
    assert (rows >= 0).all()
    stored = np.asarray(xr.open_zarr(tmp_path / "s.zarr", group="s2", consolidated=False)["embedding"].values, np.float64)
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True)
    q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    exact = np.einsum("qd,qkd->qk", q, unit[rows])
    np.testing.assert_allclose(scores, exact, rtol=0, atol=2e-6)
    assert (np.diff(scores, axis=1) <= 1e-7).all()  # best first


# -- a real sample store, encoded in-process (tests 4, 7, 8) ---------------------------------------


from test_damage import arrays as _arrays, assert_same_arrays as _assert_same_arrays, encode_s2 as _encode_s2  # noqa: E402


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, client) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("clean") / "store.zarr"
    summary = _encode_s2(store, client)
    assert summary.chunks_encoded == 8
    return store, _arrays(store)


# -- 4. a chunk's data before its ledger entry ------------------------------------------------------


class _PowerCut(Exception):
    pass


class _CutAfterData:
    """A store group whose `valid` writes (the last of a shard's data: embedding, its row checksums,
    then valid) land on disk and then fail: a crash after the data, before anything else."""

    def __init__(self, group):
        self._group = group

    def __getitem__(self, name):
        array = self._group[name]
        return _FailAfterWrite(array) if name == "valid" else array

    def __getattr__(self, name):
        return getattr(self._group, name)

    def __contains__(self, name):
        return name in self._group


class _FailAfterWrite:
    def __init__(self, array):
        self._array = array

    def __setitem__(self, key, value):
        self._array[key] = value
        raise _PowerCut("power cut after the data write")

    def __getitem__(self, key):
        return self._array[key]

    def __getattr__(self, name):
        return getattr(self._array, name)


def test_a_fault_after_a_chunks_data_leaves_it_not_done_and_the_next_encode_writes_it(clean_store, client, tmp_path,
                                                                                      monkeypatch):
    """The ledger is written after the data: a crash between the two leaves the chunks of that shard
    not done (whatever of their data reached the disk), and the next encode encodes them again; the
    store ends equal to a clean one."""
    from rsretrieve.store import EmbeddingStore
    from rsretrieve.store.integrity import verify
    from rsretrieve.store.writer import ShardWriter

    _, clean = clean_store
    store = tmp_path / "store.zarr"
    original = ShardWriter.__init__

    def faulty_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.group = _CutAfterData(self.group)

    monkeypatch.setattr(ShardWriter, "__init__", faulty_init)
    with pytest.raises(Exception) as raised:
        _encode_s2(store, client)
    assert any(isinstance(e, _PowerCut) for e in _chain(raised.value)), raised.value
    monkeypatch.setattr(ShardWriter, "__init__", original)
    after_fault = _arrays(store)
    assert after_fault["valid"].any()  # the data did reach the disk ...
    assert not after_fault["chunk_done"].any()  # ... and no chunk is marked done
    assert (after_fault["chunk_valid"] <= 0).all()
    summary = _encode_s2(store, client)
    assert summary.chunks_already_done == 0 and summary.chunks_encoded == 8
    assert verify(EmbeddingStore(store)) == []
    _assert_same_arrays(store, clean)


def _chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# -- 7. an index recorded for another store ----------------------------------------------------------


@pytest.mark.parametrize("owner", ["this store", "another store"])
def test_an_index_of_another_store_is_refused_never_current_and_reported(clean_store, tmp_path, owner):
    """An index.json carrying another store's id, at the place of this store's index, with files
    matching their record and the same embeddings' provenance: loading refuses it, it is never
    current (nor grown), and `verify` reports it. The same index recorded for this store passes all
    three (the control: only the id differs)."""
    from rsretrieve.errors import StoreError
    from rsretrieve.retrieval import EmbeddingIndex
    from rsretrieve.retrieval.index_meta import growable_meta, index_dir, index_is_current
    from rsretrieve.retrieval.verify import verify_archive
    from rsretrieve.store import EmbeddingStore

    store = EmbeddingStore(clean_store[0])
    indexes = tmp_path / "indexes"
    directory = index_dir(indexes, store.path, store.store_id, "s2")
    recorded_id = store.store_id if owner == "this store" else "0f" * 16
    assert recorded_id != store.store_id or owner == "this store"
    index = EmbeddingIndex.build(store.open("s2", index=False), "s2", kind="flat", use_gpu=False, store_path=store.path)
    index.save(directory, store_id=recorded_id)
    assert json.loads((directory / "index.json").read_text())["store_id"] == recorded_id
    provenance, n_rows = store.provenance("s2"), int(store.zarr_group("s2")["valid"].shape[0])
    current = index_is_current(directory, provenance, n_rows, selection={"n_selected": store.valid_count("s2")},
                               store_id=store.store_id)
    findings = [str(f) for f in verify_archive(store.path, indexes)]
    if owner == "this store":
        assert EmbeddingIndex.load(directory, expected_provenance=provenance, use_gpu=False, store_id=store.store_id).ntotal == 24
        assert current and growable_meta(directory, provenance, store.store_id) is not None
        assert findings == []
        return
    with pytest.raises(StoreError, match="another store"):
        EmbeddingIndex.load(directory, expected_provenance=provenance, use_gpu=False, store_id=store.store_id)
    assert not current
    assert growable_meta(directory, provenance, store.store_id) is None
    assert len(findings) == 1 and "another store" in findings[0] and str(directory) in findings[0], findings


# -- 8. a shard index damaged in place --------------------------------------------------------------


def _flip_in_shard_index(shard: Path, index_bytes: int) -> None:
    """Clear the lowest set bit of the first inner chunk's length in the index at the end of a
    shard: the file keeps its length, the index its shape and lists nothing past the data (a
    shorter chunk), so only its CRC32C tells."""
    data = bytearray(shard.read_bytes())
    at = len(data) - index_bytes + 8  # (offset, nbytes) uint64 pairs, little-endian, then the CRC32C
    nbytes = int.from_bytes(data[at : at + 8], "little")
    assert 0 < nbytes < len(data)
    data[at : at + 8] = (nbytes & (nbytes - 1)).to_bytes(8, "little")
    shard.write_bytes(bytes(data))


def test_a_shard_index_flipped_in_place_is_named_by_info_and_verify_and_repaired_by_encode(clean_store, client, tmp_path):
    import zarr

    from rsretrieve.store import EmbeddingStore
    from rsretrieve.store.integrity import damaged_chunks, verify

    clean_path, clean = clean_store
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_path, store)
    embedding = zarr.open_array(store / "s2" / "embedding", mode="r")
    (sharding,) = [c for c in embedding.metadata.codecs if type(c).__name__ == "ShardingCodec"]
    shard_rows, inner_rows = embedding.metadata.chunk_grid.chunk_shape[0], sharding.chunk_shape[0]
    index_bytes = -(-shard_rows // inner_rows) * 16 + 4  # the zarr v3 sharding spec's index, with its crc32c
    shard = store / "s2" / "embedding" / embedding.metadata.chunk_key_encoding.encode_chunk_key((0, 0))
    size = shard.stat().st_size
    _flip_in_shard_index(shard, index_bytes)
    assert shard.stat().st_size == size
    opened = EmbeddingStore(store)
    damaged = damaged_chunks(opened, "s2")  # what `info` and `encode` check
    rows_in_shard = min(shard_rows, clean["valid"].size)
    in_shard = [str(k) for k, s in zip(clean["chunk_key"], clean["chunk_start"]) if s < rows_in_shard]
    assert sorted(damaged) == sorted(in_shard), damaged
    assert all("index fails its checksum" in why for why in damaged.values()), damaged
    found = [str(f) for f in verify(opened)]
    assert any("s2/embedding" in line or "embedding shard" in line for line in found), found
    summary = _encode_s2(store, client)
    assert summary.chunks_encoded == len(in_shard)
    assert damaged_chunks(EmbeddingStore(store), "s2") == {} and verify(EmbeddingStore(store)) == []
    _assert_same_arrays(store, clean)
