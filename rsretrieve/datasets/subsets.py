"""Named subsets of BigEarthNet-v2: a filter on the metadata table, an expected pair count, a
default k for retrieval evaluation and a description.

The acquisition month comes from the date in the S2 patch name
(`S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57` -> June). Patches with seasonal snow or
cloud/shadow are excluded by default (they are not in `metadata.parquet` of the release at all;
`include_snow_cloud=True` keeps those that are present in the table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa

from rsretrieve.errors import RSRetrieveError

COUNTRIES: tuple[str, ...] = (
    "Austria", "Belgium", "Finland", "Ireland", "Kosovo",
    "Lithuania", "Luxembourg", "Portugal", "Serbia", "Switzerland",
)

# the one acquisition-date pattern of BigEarthNet patch names (also used by rsretrieve.datasets.benv2)
_DATE = re.compile(r"_(\d{4})(\d{2})(\d{2})T(\d{6})")


def acquisition_time(name: str) -> datetime | None:
    """Acquisition time of the first `_YYYYMMDDTHHMMSS` in a patch name
    (`..._20170613T101031_...`), or None."""
    m = _DATE.search(name)
    return datetime.strptime("".join(m.groups()[:3]) + "T" + m.group(4), "%Y%m%dT%H%M%S") if m else None


def acquisition_month(patch_id: str) -> int | None:
    """Month (1-12) of the first date in a patch name, or None."""
    m = _DATE.search(patch_id)
    return int(m.group(2)) if m else None


@dataclass(frozen=True)
class Subset:
    name: str
    description: str
    expected_pairs: int | None  # on the official metadata.parquet, snow/cloud excluded
    default_k: int
    countries: tuple[str, ...] | None = None  # None: any
    months: tuple[int, ...] | None = None  # None: any

    def mask(self, table: pa.Table, include_snow_cloud: bool = False) -> np.ndarray:
        """Boolean row mask over a BigEarthNet-v2 metadata table (needs `patch_id`, and `country`
        when the subset filters on countries)."""
        n = table.num_rows
        keep = np.ones(n, dtype=bool)
        if self.countries is not None:
            if "country" not in table.column_names:
                raise RSRetrieveError(f"subset {self.name}: the metadata table has no 'country' column")
            allowed = set(self.countries)
            keep &= np.array([c in allowed for c in table.column("country").to_pylist()], dtype=bool)
        if self.months is not None:
            allowed_m = set(self.months)
            keep &= np.array(
                [acquisition_month(p or "") in allowed_m for p in table.column("patch_id").to_pylist()], dtype=bool
            )
        if not include_snow_cloud:
            for col in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
                if col in table.column_names:
                    flags = np.array([bool(v) for v in table.column(col).to_pylist()], dtype=bool)
                    keep &= ~flags
        return keep

    def apply(self, table: pa.Table, include_snow_cloud: bool = False) -> pa.Table:
        return table.filter(pa.array(self.mask(table, include_snow_cloud)))


SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset(
            "BENv2-14k",
            "Serbia, summer (June-August acquisitions), snow/cloud excluded",
            13_683,
            10,
            countries=("Serbia",),
            months=(6, 7, 8),
        ),
        Subset(
            "BENv2-243k",
            "all ten countries, summer and autumn (June-November acquisitions), snow/cloud excluded",
            243_130,
            10,
            countries=COUNTRIES,
            months=(6, 7, 8, 9, 10, 11),
        ),
        Subset(
            "sample",
            "the bundled real sample (24 BigEarthNet-v2 pairs from the configilm 0.7.1 wheel; "
            "18 without snow/cloud)",
            18,
            3,
        ),
    )
}


def get_subset(name: str) -> Subset:
    for key, subset in SUBSETS.items():
        if key.lower() == name.lower():
            return subset
    raise RSRetrieveError(f"{name}: unknown subset; known: {', '.join(SUBSETS)}")


def check_count(subset: Subset | str, n: int) -> str | None:
    """A one-line message when `n` pairs differ from the subset's expected count, else None."""
    s = get_subset(subset) if isinstance(subset, str) else subset
    if s.expected_pairs is None or n == s.expected_pairs:
        return None
    return f"subset {s.name}: expected {s.expected_pairs:,} pairs, found {n:,} in this metadata"
