"""JSON text that every JSON parser reads: no bare NaN or Infinity, ever.

Python's `json.dumps` writes float NaN and infinities as the bare tokens `NaN` / `Infinity`, which
are not JSON (RFC 8259): `JSON.parse`, jq and strict parsers reject the whole document. Every JSON
that rsretrieve prints or writes goes through `dumps`: missing and non-finite numbers become
`null` first, and `allow_nan=False` makes any value that slipped through an error, not a broken file.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every NaN / infinite float (Python or numpy) replaced by None, numpy scalars and
    arrays as plain Python values, tuples as lists; dicts and lists walked recursively."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # numpy scalar or array
        return finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs) -> str:
    """`json.dumps` of `finite(value)` with `allow_nan=False` (other objects through `default`,
    `str` unless given)."""
    kwargs.setdefault("default", str)
    return json.dumps(finite(value), allow_nan=False, **kwargs)


__all__ = ["dumps", "finite"]
