"""BigEarthNet-v2 (reBEN) reader: the release GeoTIFF tree and the rico-hdl LMDB.

Release layout (REFERENCE.md section 3):
    <root>/BigEarthNet-S2/<S2 product>/<patch_id>/<patch_id>_<band>.tif
    <root>/BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_{VV,VH}.tif
    <root>/metadata.parquet  (+ metadata_for_patches_with_snow_cloud_or_shadow.parquet)
The product folder is the patch name without its trailing `_<row>_<col>` for S2
(`S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP`), and without `_<tile>_<row>_<col>` for S1
(`S1A_IW_GRDH_1SDV_20170613T165043`), as the release, the bigearthnet-pipeline that builds it,
TorchGeo and rico-hdl have it. Paths are built from the name, never found by walking the tree; a
tree whose folders are not where the release puts them is a one-line error naming the folder.

rico-hdl LMDB: key = patch name (S2 patch_id or s1_name), value = safetensors bytes of a dict
band name -> 2-D array (S2 uint16 at native size, S1 float32 dB).

Pixels come back raw (`pixels.RawPixels`): S2 digital numbers as uint16 with the 10 m bands at
120 px and the 20 m bands at their native 60 px, S1 dB as float32; the model's preprocessing does
the rest. S1 and S2 patches pair through `s1_name`; both carry pair_id = S2 patch_id.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.bands import Modality, bands_for
from rsretrieve.datasets.base import PATCH, Chunk, PatchBatch, empty_batch, meta_table
from rsretrieve.errors import DataError, ModalityAbsent, RSRetrieveError, located
from rsretrieve.geo import centres_to_wgs84, pixel_to_xy
from rsretrieve.datasets.benv2_patch import at_10m, read_lmdb_patch, read_patch_folder, stack_raw
from rsretrieve.io.lmdb import open_env
from rsretrieve.labels import multi_hot
from rsretrieve.pixels import RawPixels
from rsretrieve.datasets.subsets import acquisition_time

META_FILE = "metadata.parquet"
SNOW_CLOUD_FILE = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
S2_DIR, S1_DIR = "BigEarthNet-S2", "BigEarthNet-S1"
META_COLUMNS = ("patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                "contains_seasonal_snow", "contains_cloud_or_shadow")
NEEDED_COLUMNS = ("patch_id", "labels", "split", "country", "s1_name")
SPLITS = ("train", "validation", "test")
DEFAULT_CHUNK_SIZE = 256
BATCH_COLUMNS = ["patch_id", "pair_id", "split", "country", "labels", "lat", "lon", "timestamp", "product_id"]

_NAME_RC = re.compile(r"^(.+)_(\d+)_(\d+)$")
GDAL_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}


# --- names and paths -------------------------------------------------------------------------

def product_of(name: str, modality: Modality = "s2") -> str:
    """Product folder of a patch: an S2 patch_id without its trailing `_<row>_<col>`, an S1
    s1_name without its trailing `_<tile>_<row>_<col>`."""
    m = _NAME_RC.match(name)
    if not m:
        raise DataError(located(name, "patch name does not end in _<row>_<col>"))
    if modality == "s2":
        return m.group(1)
    product, _, tile = m.group(1).rpartition("_")
    if not product or not tile:
        raise DataError(located(name, "S1 patch name does not end in _<tile>_<row>_<col>"))
    return product


def timestamp_of(name: str) -> datetime | None:
    """Acquisition time from a patch name (`..._20170613T101031_...`), or None."""
    return acquisition_time(name)


def patch_dir(root: Path, name: str, modality: Modality) -> Path:
    return Path(root) / (S2_DIR if modality == "s2" else S1_DIR) / product_of(name, modality) / name


def band_path(root: Path, name: str, modality: Modality, band: str) -> Path:
    return patch_dir(root, name, modality) / f"{name}_{band}.tif"


def has_tree(root: Path) -> bool:
    return (Path(root) / S2_DIR).is_dir() or (Path(root) / S1_DIR).is_dir()


def find_lmdb(root: Path) -> Path | None:
    root = Path(root)
    if (root / "data.mdb").is_file():
        return root
    for cand in sorted(root.glob("*")):
        if cand.is_dir() and (cand / "data.mdb").is_file():
            return cand
    return None


def read_tree_patch(root: Path, name: str, modality: Modality, converted: list[str] | None = None):
    """Raw (10 m bands, 20 m bands) and the patch centre (x, y, crs) or None, from the GeoTIFF tree
    (conversions made appended to `converted`, see `benv2_patch.assemble`)."""
    raw, transform, crs = read_patch_folder(patch_dir(root, name, modality), modality, name, converted)
    centre = None
    if crs is not None:
        x, y = pixel_to_xy(transform, PATCH / 2.0, PATCH / 2.0)
        centre = (x, y, crs.to_string())
    return raw, centre


def tree_centre(root: Path, name: str, modality: Modality):
    """Patch centre (x, y, crs) from the header of its first 10 m band file; None when the file
    is missing or carries no georeference (the layout itself is checked by `check_layout`)."""
    import rasterio
    from rasterio.errors import RasterioError

    path = band_path(root, name, modality, bands_for(modality)[0])
    try:
        with rasterio.open(path) as ds:
            if ds.crs is None:
                return None
            x, y = pixel_to_xy(ds.transform, ds.width / 2.0, ds.height / 2.0)
            return (x, y, ds.crs.to_string())
    except (RasterioError, OSError):
        return None


LAYOUT_PROBE = 8  # patches looked up before a tree's layout is declared wrong


def check_layout(root: Path, names: list[str], modality: Modality) -> None:
    """DataError naming the expected folder when none of the first patches of a selection is where
    the release puts it (a wrong root, an unpacked archive missing, or a pre-release layout)."""
    probe = names[:LAYOUT_PROBE]
    if not probe or any(patch_dir(root, n, modality).is_dir() for n in probe):
        return
    expected = patch_dir(root, probe[0], modality)
    folder = S2_DIR if modality == "s2" else S1_DIR
    if not (Path(root) / folder).is_dir():
        raise ModalityAbsent(located(Path(root) / folder, f"no such folder: this root holds no {modality.upper()} patches"))
    pattern = "<product>/<patch_id>" if modality == "s2" else "<product>/<s1_name> (product = s1_name without _<tile>_<row>_<col>)"
    old = Path(root) / folder / _NAME_RC.match(probe[0]).group(1) / probe[0]
    hint = f"; found {old.parent.name}/ instead, a pre-release layout: move each patch folder up to its product folder" if old.is_dir() else ""
    raise DataError(located(expected, f"no such folder: the release puts {modality.upper()} patches in {folder}/{pattern}{hint}"))


# --- metadata --------------------------------------------------------------------------------

_META_CACHE: dict[tuple, pa.Table] = {}


def read_metadata(path: Path) -> pa.Table:
    """A BigEarthNet-v2 metadata parquet, checked for the needed columns (cached per process)."""
    path = Path(path)
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise DataError(located(path, "metadata parquet not found")) from None
    key = (str(path), stamp)
    if key not in _META_CACHE:
        try:
            schema = pq.read_schema(path)
            missing = [c for c in NEEDED_COLUMNS if c not in schema.names]
            if missing:
                raise DataError(located(path, f"missing column(s) {', '.join(missing)}"))
            table = pq.read_table(path, columns=[c for c in META_COLUMNS if c in schema.names])
        except DataError:
            raise
        except (pa.ArrowException, OSError) as e:
            raise DataError(located(path, f"unreadable parquet ({' '.join(str(e).split())})")) from None
        for col in ("contains_seasonal_snow", "contains_cloud_or_shadow"):
            if col not in table.column_names:
                table = table.append_column(col, pa.array([False] * table.num_rows))
        for labels in table.column("labels").to_pylist():
            try:
                multi_hot(labels or [])
            except KeyError as e:
                raise DataError(located(path, str(e.args[0]))) from None
        _refuse_duplicates(path, table)
        _META_CACHE[key] = table
    return _META_CACHE[key]


def _refuse_duplicates(path: Path, table: pa.Table) -> None:
    """A DataError naming the first duplicated ids when a patch (S2 `patch_id` or S1 `s1_name`) has
    two rows: its store row would be written twice (the ledger counted 19 encoded, 18 valid, and
    the encode never completed). Arrow's hash counts, once per metadata file."""
    import pyarrow.compute as pc

    for column in ("patch_id", "s1_name"):
        if column not in table.column_names:
            continue
        values = table.column(column)
        if pc.count_distinct(values).as_py() == len(values) - values.null_count:
            continue
        counts = pc.value_counts(values)
        repeated = [v.as_py() for v, n in zip(counts.field("values"), counts.field("counts")) if n.as_py() > 1]
        shown = ", ".join(repeated[:3]) + (f" (+{len(repeated) - 3} more)" if len(repeated) > 3 else "")
        raise DataError(located(path, f"{len(repeated)} {column} value(s) on more than one row: {shown}"))


class BENv2Dataset:
    """BigEarthNet-v2 from the release tree or a rico-hdl LMDB (see module docstring)."""

    def __init__(
        self,
        root: Path | str,
        *,
        source: str = "auto",
        subset: str | None = None,
        split: str | list[str] | None = None,
        include_snow_cloud: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        metadata: Path | str | None = None,
        tree_root: Path | str | None = None,
        dataset_name: str = "benv2",
    ):
        self.root = Path(root)
        self.name = dataset_name
        self.include_snow_cloud = include_snow_cloud
        self.chunk_size = int(chunk_size)
        if self.chunk_size < 1:
            raise RSRetrieveError(f"chunk_size must be >= 1, got {chunk_size}")
        if not self.root.exists():
            raise DataError(located(self.root, "dataset root not found"))
        lmdb_path = find_lmdb(self.root)
        if source == "auto":
            source = "tree" if has_tree(self.root) else "lmdb" if lmdb_path else ""
            if not source:
                raise DataError(located(self.root, f"neither a {S2_DIR}/{S1_DIR} tree nor an LMDB (data.mdb) found"))
        if source == "tree":
            if not has_tree(self.root):
                raise DataError(located(self.root, f"no {S2_DIR}/ or {S1_DIR}/ folder"))
            self.data_path = self.root
            self.tree_root = self.root
        elif source == "lmdb":
            if lmdb_path is None:
                raise DataError(located(self.root, "no LMDB (data.mdb) found"))
            self.data_path = lmdb_path
            tr = Path(tree_root) if tree_root else (self.root if has_tree(self.root) else None)
            self.tree_root = tr
        else:
            raise RSRetrieveError(f"source must be 'auto', 'tree' or 'lmdb', got {source!r}")
        self.source = source
        if metadata is None:
            base = self.root if (self.root / META_FILE).exists() or source == "tree" else lmdb_path.parent
            metadata = base / META_FILE
        self.metadata_path = Path(metadata)
        self.snow_cloud_path = self.metadata_path.with_name(SNOW_CLOUD_FILE)
        if isinstance(split, str):
            split = [split]
        if split is not None:
            bad = [s for s in split if s not in SPLITS]
            if bad:
                raise RSRetrieveError(f"unknown split(s) {bad}; expected {', '.join(SPLITS)}")
        self.splits = tuple(split) if split else None
        self.subset = None
        if subset:
            from rsretrieve.datasets.subsets import get_subset

            self.subset = get_subset(subset)
        self._cache: dict = {}

    # pickling: drop caches (tables, lat/lon), keep only paths and options
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        return f"BENv2Dataset({self.name!r}, {self.data_path}, source={self.source!r})"

    # --- selection
    def pairs(self) -> pa.Table:
        """The selected rows of metadata.parquet (+ snow/cloud rows when included): one per pair."""
        if "pairs" not in self._cache:
            table = read_metadata(self.metadata_path)
            if self.include_snow_cloud and self.snow_cloud_path.exists():
                extra = read_metadata(self.snow_cloud_path).select(table.column_names)
                table = pa.concat_tables([table, extra.cast(table.schema)])
            if self.subset is not None:
                table = self.subset.apply(table, include_snow_cloud=self.include_snow_cloud)
            elif not self.include_snow_cloud:
                from rsretrieve.datasets.subsets import Subset

                table = Subset("all", "", None, 10).apply(table)
            if self.splits is not None:
                table = table.filter(pa.compute.is_in(table.column("split"), pa.array(self.splits)))
            self._cache["pairs"] = table
        return self._cache["pairs"]

    def count_message(self) -> str | None:
        """Expected-vs-found message for the named subset (None when it matches or none is set)."""
        from rsretrieve.datasets.subsets import check_count

        if self.subset is None or self.splits is not None or self.include_snow_cloud:
            return None
        return check_count(self.subset, self.pairs().num_rows)

    def _index(self) -> dict[str, int]:
        if "index" not in self._cache:
            t = self.pairs()
            idx = {p: i for i, p in enumerate(t.column("patch_id").to_pylist())}
            idx.update({s: i for i, s in enumerate(t.column("s1_name").to_pylist())})
            self._cache["index"] = idx
        return self._cache["index"]

    def names(self, modality: Modality) -> list[str]:
        col = "patch_id" if modality == "s2" else "s1_name"
        return self.pairs().column(col).to_pylist()

    # --- PatchDataset
    def chunks(self, modality: Modality) -> list[Chunk]:
        bands_for(modality)
        names = self.names(modality)
        if self.source == "tree":
            check_layout(self.data_path, names, modality)
        out = []
        for i in range(0, len(names), self.chunk_size):
            part = tuple(names[i : i + self.chunk_size])
            out.append(Chunk(self.name, f"{self.name}:{modality}:{i // self.chunk_size:06d}", modality,
                             self.source, str(self.data_path), part, -1, len(part)))
        return out

    def _meta_columns(self, names: list[str], modality: Modality, centres: list) -> dict[str, list]:
        t = self.pairs()
        index = self._index()
        rows = [index[n] for n in names]
        take = t.take(pa.array(rows, pa.int64())) if rows else t.slice(0, 0)
        lat, lon = centres_to_wgs84(centres)
        return {
            "patch_id": list(names),
            "pair_id": take.column("patch_id").to_pylist(),
            "split": take.column("split").to_pylist(),
            "country": take.column("country").to_pylist(),
            "labels": take.column("labels").to_pylist(),
            "lat": lat,
            "lon": lon,
            "timestamp": [timestamp_of(n) for n in names],
            "product_id": [product_of(n, modality) for n in names],
        }

    def patch_rows(self, modality: Modality) -> pa.Table:
        return self.metadata(modality, locations=False)

    def metadata(self, modality: Modality, locations: bool = True) -> pa.Table:
        """One row per selected patch, in chunk order, without reading pixels. lat/lon come from
        the GeoTIFF headers when a tree is available, else they are null; `locations=False` leaves
        them null without opening a file (the encoder stage fills them in from each chunk's read)."""
        key = ("metadata", modality, locations)
        if key not in self._cache:
            names = self.names(modality)
            if self.tree_root is not None:
                check_layout(self.tree_root, names, modality)
            if self.tree_root is not None and locations:
                import rasterio

                with rasterio.Env(**GDAL_ENV):
                    centres = [tree_centre(self.tree_root, n, modality) for n in names]
            else:
                centres = [None] * len(names)
            self._cache[key] = meta_table(self._meta_columns(names, modality, centres))
        return self._cache[key]

    def read_chunk(self, chunk: Chunk) -> PatchBatch:
        """Read and validate one chunk; bad patches go to `skipped`, never zero-filled."""
        import rasterio

        modality = chunk.modality
        pixels, names, centres, skipped, converted = [], [], [], [], []
        index = self._index()
        with rasterio.Env(**GDAL_ENV):
            # the process's one LMDB environment; a read transaction of this thread's own
            txn = open_env(Path(chunk.path)).begin(buffers=False) if chunk.source == "lmdb" else None
            try:
                for name in chunk.patch_ids:
                    if name not in index:
                        skipped.append((name, located(self.metadata_path, f"{name} is not in the selected metadata")))
                        continue
                    notes: list[str] = []
                    try:
                        if chunk.source == "tree":
                            raw, centre = read_tree_patch(Path(chunk.path), name, modality, notes)
                        else:
                            raw = read_lmdb_patch(Path(chunk.path), name, modality, txn, notes)
                            centre = tree_centre(self.tree_root, name, modality) if self.tree_root else None
                    except DataError as e:
                        skipped.append((name, str(e)))
                        continue
                    pixels.append(raw)
                    names.append(name)
                    centres.append(centre)
                    converted.extend((name, note) for note in notes)
            finally:
                if txn is not None:
                    txn.abort()
        keep = self._one_layout(chunk, pixels, names, skipped)
        pixels, names, centres = [pixels[i] for i in keep], [names[i] for i in keep], [centres[i] for i in keep]
        kept = set(names)
        converted = [(name, note) for name, note in converted if name in kept]
        if not names:
            return empty_batch(modality, BATCH_COLUMNS, skipped)
        return PatchBatch(stack_raw(pixels, modality), names, meta_table(self._meta_columns(names, modality, centres)), skipped, converted)

    def _one_layout(self, chunk: Chunk, pixels: list, names: list[str], skipped: list) -> list[int]:
        """Positions of the patches a chunk's batch keeps: all, unless some have their 20 m bands at
        60 px and others on the 10 m grid (not nearest-upsampled copies, `benv2_patch.assemble`),
        which one batch cannot hold; then the release's 60 px ones, the others skipped, named."""
        full = [at_10m(p, chunk.modality) for p in pixels]
        if all(full) or not any(full):
            return list(range(len(pixels)))
        for name in (n for n, f in zip(names, full) if f):
            where = patch_dir(Path(chunk.path), name, chunk.modality) if chunk.source == "tree" else f"{chunk.path}[{name}]"
            skipped.append((name, located(where, "20 m bands at 120 px beside patches with them at 60 px in one chunk "
                                                 "(one layout per chunk; re-export them at 60 px)")))
        return [i for i, f in enumerate(full) if not f]

    # --- convenience
    def describe(self) -> dict:
        """Where patches are read from, for the store's provenance."""
        return {"source": self.source, "layout": "release" if self.source == "tree" else "rico-hdl lmdb"}

    def read_patch(self, name: str, modality: Modality) -> RawPixels:
        """Raw pixels of one patch; DataError if it is bad."""
        if self.source == "tree":
            raw, _ = read_tree_patch(self.data_path, name, modality)
        else:
            raw = read_lmdb_patch(self.data_path, name, modality)
        return stack_raw([raw], modality)
