"""Registries other packages extend through entry points, as xarray's backends and TorchGeo-style
projects do: a package declares, in its `pyproject.toml`,

    [project.entry-points."rsretrieve.datasets"]
    mydata = "mypackage.reader:ENTRY"            # an rsretrieve.datasets.DatasetEntry

    [project.entry-points."rsretrieve.models"]
    mymodels = "mypackage.configs:CONFIGS"       # a CSMoEConfig, or an iterable of them

and, once installed, `rsretrieve index --dataset mydata --model my-config` finds them. rsretrieve's
own datasets and configs are registered the same way (its `pyproject.toml`). A registry loads its
entry points on first use, so a plugin may import rsretrieve freely; a plugin that fails to load
is reported in one warning and left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable


class EntryPointRegistry(dict):
    """A dict of name -> object, filled from an entry-point group on first use. `builtins()` gives
    rsretrieve's own entries when its package metadata is absent (a source tree not installed)."""

    def __init__(self, group: str, add: Callable[["EntryPointRegistry", str, object], None],
                 builtins: Callable[[], Iterable[tuple[str, object]]]):
        super().__init__()
        self.group, self._add, self._builtins, self._loaded = group, add, builtins, False

    def load(self) -> "EntryPointRegistry":
        if self._loaded:
            return self
        self._loaded = True
        from importlib.metadata import entry_points

        found = list(entry_points(group=self.group))
        if not any(ep.value.startswith("rsretrieve.") for ep in found):
            for name, obj in self._builtins():
                self._add(self, name, obj)
        for ep in found:
            try:
                self._add(self, ep.name, ep.load())
            except Exception as exc:  # noqa: BLE001 — a broken plugin must not break the tool
                warnings.warn(f"rsretrieve: the {self.group} plugin {ep.name!r} ({ep.value}) was not loaded: "
                              f"{' '.join(f'{type(exc).__name__}: {exc}'.split())[:200]}", stacklevel=2)
        return self

    def __getitem__(self, key):
        return dict.__getitem__(self.load(), key)

    def __contains__(self, key) -> bool:
        return dict.__contains__(self.load(), key)

    def __iter__(self):
        return dict.__iter__(self.load())

    def __len__(self) -> int:
        return dict.__len__(self.load())

    def get(self, key, default=None):
        return dict.get(self.load(), key, default)

    def keys(self):
        return dict.keys(self.load())

    def values(self):
        return dict.values(self.load())

    def items(self):
        return dict.items(self.load())
