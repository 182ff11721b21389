"""Named subsets: filters on a metadata table built here."""

import pyarrow as pa
import pytest

from rsretrieve.errors import RSRetrieveError
from rsretrieve.datasets.subsets import COUNTRIES, SUBSETS, acquisition_month, check_count, get_subset


def name(date: str, i: int) -> str:
    return f"S2A_MSIL2A_{date}T101031_N9999_R022_T34TDQ_{i}_0"


ROWS = [  # (patch date, country, snow, cloud)
    ("20170531", "Serbia", False, False),  # May 31: outside summer
    ("20170601", "Serbia", False, False),  # June 1: in
    ("20170831", "Serbia", False, False),  # Aug 31: in 14k
    ("20170901", "Serbia", False, False),  # Sep 1: out of 14k, in 243k
    ("20171130", "Serbia", False, False),  # Nov 30: in 243k
    ("20171201", "Serbia", False, False),  # Dec 1: out
    ("20170715", "Austria", False, False),  # summer, not Serbia
    ("20170715", "Serbia", True, False),  # snow
    ("20170715", "Serbia", False, True),  # cloud
    ("20171015", "Portugal", False, False),
    ("20170715", "Narnia", False, False),  # not one of the ten countries
]


@pytest.fixture
def table():
    return pa.table({
        "patch_id": [name(d, i) for i, (d, *_rest) in enumerate(ROWS)],
        "country": [r[1] for r in ROWS],
        "contains_seasonal_snow": [r[2] for r in ROWS],
        "contains_cloud_or_shadow": [r[3] for r in ROWS],
    })


def picked(subset, table, **kw):
    return [i for i, k in enumerate(subset.mask(table, **kw)) if k]


def test_months_from_name():
    assert acquisition_month(name("20170613", 0)) == 6
    assert acquisition_month("S1B_IW_GRDH_1SDV_20171101T153951_35VNJ_0_0") == 11
    assert acquisition_month("no-date") is None


def test_benv2_14k(table):
    s = get_subset("BENv2-14k")
    assert picked(s, table) == [1, 2]
    assert picked(s, table, include_snow_cloud=True) == [1, 2, 7, 8]
    assert s.expected_pairs == 13_683 and s.default_k == 10


def test_benv2_243k(table):
    s = get_subset("benv2-243k")
    assert picked(s, table) == [1, 2, 3, 4, 6, 9]
    assert s.expected_pairs == 243_130 and s.default_k == 10
    assert len(COUNTRIES) == 10


def test_sample_all_rows(table):
    s = SUBSETS["sample"]
    assert picked(s, table) == [i for i, r in enumerate(ROWS) if not (r[2] or r[3])]
    assert s.default_k == 3 and s.apply(table).num_rows == 9


def test_check_count_and_unknown():
    assert check_count("BENv2-14k", 13_683) is None
    msg = check_count("BENv2-14k", 13_000)
    assert "13,683" in msg and "13,000" in msg
    with pytest.raises(RSRetrieveError, match="unknown subset"):
        get_subset("BENv2-1k")


def test_sample_dataset_subset_count():
    from rsretrieve.datasets import open_dataset

    ds = open_dataset("sample")
    assert ds.count_message() is None
    clear = {"include_snow_cloud": False}  # the paper's selection; the bundled archive keeps all 24
    assert open_dataset("sample", subset="BENv2-14k", **clear).pairs().num_rows == 0  # no Serbia in the sample
    assert open_dataset("sample", subset="BENv2-243k", **clear).pairs().num_rows == 18  # all June, Austria
    assert "expected 243,130" in open_dataset("sample", subset="BENv2-243k", **clear).count_message()
