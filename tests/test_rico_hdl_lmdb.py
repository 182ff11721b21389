"""The LMDB reader on an LMDB that rico-hdl itself wrote (tests/data/rico_hdl, made by
tools/golden/make_rico_hdl_lmdb.py from rico-hdl's integration-test fixture), not on one that this
project's own fixture encoded: its pixels equal the release GeoTIFFs rico-hdl encoded, read with
rasterio, and what the GeoTIFF-tree reader gives."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsretrieve.bands import bands_for
from rsretrieve.datasets import open_dataset
from rsretrieve.datasets.benv2 import band_path
from rsretrieve.pixels import RawPixels

ROOT = Path(__file__).resolve().parent / "data" / "rico_hdl"
NAMES = {"s2": "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_75_43", "s1": "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_70_48"}
S2_ALL = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


def test_the_fixture_is_rico_hdls_own():
    source = json.loads((ROOT / "SOURCE.json").read_text())
    assert source["files"]["integration_tests/BigEarthNet_LMDB/data.mdb"] == "BigEarthNet-V2-LMDB/data.mdb"
    assert len(source["rico_hdl_commit"]) == 40


@pytest.mark.parametrize("modality", ["s2", "s1"])
def test_the_lmdb_reader_reads_rico_hdls_lmdb_as_the_release_geotiffs(modality):
    lm = open_dataset("benv2", ROOT, source="lmdb")
    tree = open_dataset("benv2", ROOT, source="tree")
    assert lm.source == "lmdb" and tree.source == "tree"
    (chunk,) = lm.chunks(modality)
    batch = lm.read_chunk(chunk)
    assert not batch.skipped and batch.patch_ids == [NAMES[modality]]
    pixels = batch.pixels
    for band in (S2_ALL if modality == "s2" else ("VV", "VH")):  # every band at its native size, as encoded
        with rasterio.open(band_path(ROOT, NAMES[modality], modality, band)) as f:
            expected = f.read(1)
        if band in ("B01", "B09"):  # not among the bands a model gets
            continue
        got = pixels.band(band)[0]
        assert got.dtype == expected.dtype and got.shape == expected.shape, band
        np.testing.assert_array_equal(got, expected, err_msg=band)
    (tree_chunk,) = tree.chunks(modality)
    a = RawPixels.concat([pixels]).stacked(bands_for(modality))
    b = RawPixels.concat([tree.read_chunk(tree_chunk).pixels]).stacked(bands_for(modality))
    assert a.shape == (1, 10 if modality == "s2" else 2, 120, 120) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
