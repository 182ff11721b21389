"""Damaged data is never served (issue 23): every chunk of every store array carries a CRC32C,
`verify` names what fails it (or is lost), `query`/`eval` refuse to answer from it, and `encode`
repairs all of it, array by array equal to a clean store afterwards.

The sweep damages each array of a real sample store three ways (a flipped bit, a truncated file, a
deleted file) and encodes in-process (one thread-based Dask client for the module)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from rsretrieve.indexer.pipeline import DatasetSpec, EncoderSpec, encode
from rsretrieve.retrieval.evaluate import evaluate
from rsretrieve.store import EmbeddingStore
from rsretrieve.store.checksum import ChecksumError
from rsretrieve.store.integrity import verify
from rsretrieve.store.rows import RowReader
from test_cli import MODEL, assert_clean_error, indexed_workspace, run, sample_patch_folder

CHUNKS = (("chunk_size", 3), ("include_snow_cloud", True))  # the sample's 24 patches in 8 chunks
# every array of a BigEarthNet-v2 store group (checked against the store below: a new array joins the sweep)
ARRAYS = ("chunk_done", "chunk_key", "chunk_start", "chunk_stop", "chunk_valid", "country", "embedding", "embedding_crc",
          "label", "labels", "lat", "lon", "pair_id", "patch_id", "product_id", "split", "timestamp", "valid")


def encode_s2(store: Path, client):
    return encode(DatasetSpec("sample", options=CHUNKS), "s2", store, EncoderSpec(MODEL, "cpu", 3), client=client)


def arrays(store: Path) -> dict[str, np.ndarray]:
    return {name: np.asarray(array[:]) for name, array in zarr.open_group(store / "s2", mode="r").arrays()}


def assert_same_arrays(store: Path, clean: dict) -> None:
    got = arrays(store)
    assert set(got) == set(clean)
    for name, values in clean.items():
        assert np.array_equal(got[name], values, equal_nan=values.dtype.kind == "f"), name


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory, client) -> tuple[Path, dict]:
    store = tmp_path_factory.mktemp("clean") / "store.zarr"
    encode_s2(store, client)
    return store, arrays(store)


def data_file(array_dir: Path) -> Path:
    (first, *_) = sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json")
    return first


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()


def test_the_sweep_covers_every_array_of_the_store(clean_store):
    store, clean = clean_store
    assert set(clean) == set(ARRAYS)
    assert verify(EmbeddingStore(store)) == []


@pytest.mark.parametrize("name", ARRAYS)
def test_each_damage_to_each_array_is_named_by_verify_and_repaired_by_encode(clean_store, client, tmp_path, name):
    clean_path, clean = clean_store
    for how in ("flip", "truncate", "delete"):
        store = tmp_path / how / "store.zarr"
        shutil.copytree(clean_path, store)
        damage(data_file(store / "s2" / name), how)
        found = [str(finding) for finding in verify(EmbeddingStore(store))]
        named = (f"s2/{name}:", f"{name} chunk file", f"lost `{name}` data")
        assert found and any(way in line for line in found for way in named), (how, found)
        encode_s2(store, client)
        assert verify(EmbeddingStore(store)) == [], how
        assert_same_arrays(store, clean)


def _nan_row(group):
    group["embedding"][4] = np.nan  # written through zarr: its checksum is right, the row is not


def _repeated_id(group):
    group["patch_id"][3] = str(group["patch_id"][2])


def _ledger_out_of_order(group):
    starts = group["chunk_start"][:]
    starts[[1, 2]] = starts[[2, 1]]
    group["chunk_start"][:] = starts


def _done_without_count(group):
    group["chunk_valid"][5] = -1


@pytest.mark.parametrize("breach", [_nan_row, _repeated_id, _ledger_out_of_order, _done_without_count], ids=lambda f: f.__name__[1:])
def test_an_invariant_broken_with_intact_checksums_is_named_and_repaired(clean_store, client, tmp_path, breach):
    """Data written wrong (an older rsretrieve, a hand edit) passes its checksums: `verify` checks
    the invariants too (valid rows finite, unique ids, a ledger that tiles the rows) and `encode`
    mends them from the data."""
    clean_path, clean = clean_store
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_path, store)
    breach(zarr.open_group(store / "s2", mode="r+"))
    assert verify(EmbeddingStore(store))
    encode_s2(store, client)
    assert verify(EmbeddingStore(store)) == []
    assert_same_arrays(store, clean)


# -- the case: one embedding row overwritten and one labels byte flipped, in a workspace ------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return indexed_workspace(tmp_path_factory.mktemp("built"))


def overwrite_row_and_flip_label(store: Path, row: int = 5) -> None:
    embedding = zarr.open_array(store / "s2" / "embedding", mode="r")
    row_bytes = embedding.shape[1] * embedding.dtype.itemsize
    shard = data_file(store / "s2" / "embedding")  # one inner chunk: rows from byte 0
    data = bytearray(shard.read_bytes())
    data[row * row_bytes:(row + 1) * row_bytes] = data[(row + 1) * row_bytes:(row + 2) * row_bytes]
    shard.write_bytes(bytes(data))
    labels = data_file(store / "s2" / "labels")
    flipped = bytearray(labels.read_bytes())
    flipped[10] ^= 0x01
    labels.write_bytes(bytes(flipped))


def test_one_row_and_one_label_byte_are_named_refused_and_repaired(built, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(built, ws)
    (store,) = (ws / "stores").glob("*.zarr")
    clean = arrays(store)
    clean_f1 = run(["eval", "sample", "--json"], ws).stdout
    overwrite_row_and_flip_label(store)

    proc = run(["verify"], ws, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "s2/embedding: rows 0-23 fail their checksum" in proc.stderr and "s2/labels: rows 0-23 fail their checksum" in proc.stderr

    s2_id = sample_patch_folder("s2", 0).name
    assert_clean_error(run(["query", "--id", s2_id, "--target", "s2", "-k", "3"], ws, check=False), "fail their checksum", "s2/")
    with pytest.raises(ChecksumError, match="fail their checksum"):
        evaluate(store, tasks=("s2s2",), k=3)

    # eval encodes first, which repairs: its F1 is the clean store's, never the damaged one's
    repaired = run(["eval", "sample", "--json"], ws)
    assert "repaired the S2 store's damaged embedding (1 part), labels (1 part)" in repaired.stderr + repaired.stdout
    assert _f1(repaired.stdout) == _f1(clean_f1)
    assert run(["verify"], ws).returncode == 0
    assert_same_arrays(store, clean)


def _f1(eval_json: str) -> dict:
    import json

    body = json.loads(eval_json[eval_json.index("{"):])
    return {task: figures["f1"] for task, figures in body["tasks"].items()}


def test_a_re_ranking_read_checks_each_row_against_its_own_checksum(clean_store, tmp_path):
    """`RowReader` reads single rows at an offset (no zarr decode): each row has its own CRC32C, so
    an on-disk index's re-rank never scores a damaged row."""
    clean_path, clean = clean_store
    store = tmp_path / "store.zarr"
    shutil.copytree(clean_path, store)
    overwrite_row_and_flip_label(store, row=7)
    reader = RowReader(store / "s2")
    np.testing.assert_array_equal(reader.read(np.array([3, 20])), clean["embedding"][[3, 20]].astype(np.float32))
    with pytest.raises(ChecksumError, match="embedding row 7 fails its checksum"):
        reader.read(np.array([3, 7]))
