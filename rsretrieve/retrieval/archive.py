"""Querying an archive: a store plus its per-modality FAISS indexes.

    archive = Archive.open("rsretrieve-workspace/stores/sample--csmoe-p16.zarr", "rsretrieve-workspace/indexes")
    result = archive.query_tile("tile.tif", target="s2", k=10)
    archive.mosaic(result, "mosaic.png")

A tile with several 120 px patches is embedded patch by patch; the query vector is the mean of the
patches' L2-normalised embeddings (the centroid direction of the tile), documented in docs/DATASETS.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import StoreError, located
from rsretrieve.labels import CLASSES
from rsretrieve.preprocess import RawPixels
from rsretrieve.provenance import is_random_init
from rsretrieve.retrieval.index_meta import index_dir
from rsretrieve.store.zarr_store import EmbeddingStore


@dataclass
class Hit:
    rank: int
    patch_id: str
    pair_id: str
    score: float
    labels: list[str]
    split: str
    lat: float | None
    lon: float | None
    row: int


@dataclass
class QueryResult:
    query_label: str
    query_modality: Modality
    target: Modality
    hits: list[Hit]
    provenance: dict
    query_pixels: RawPixels = field(repr=False)  # the query's (first) patch, raw

    @property
    def random_init(self) -> bool:
        return is_random_init(self.provenance)

    def to_dict(self) -> dict:
        return {
            "query": self.query_label,
            "query_modality": self.query_modality,
            "target": self.target,
            "random_init": self.random_init,
            "provenance": {k: self.provenance.get(k) for k in ("model", "checkpoint_sha256", "checkpoint_path")},
            "results": [asdict(h) for h in self.hits],
        }

    def to_geojson(self) -> dict:
        features = []
        for hit in self.hits:
            geometry = None if hit.lat is None or np.isnan(hit.lat) else {"type": "Point", "coordinates": [hit.lon, hit.lat]}
            props = {k: v for k, v in asdict(hit).items() if k not in ("lat", "lon")}
            features.append({"type": "Feature", "geometry": geometry, "properties": props})
        return {"type": "FeatureCollection", "features": features, "properties": {k: v for k, v in self.to_dict().items() if k != "results"}}


def short_id(patch_id: str) -> str:
    """The distinctive tail of a patch name (tile, row, col) for captions: the full id is long."""
    parts = patch_id.replace("/", "_").split("_")
    return "_".join(parts[-3:]) if len(parts) > 3 else patch_id


class Archive:
    """A store's embeddings and indexes, with the model that made them, ready for queries."""

    def __init__(self, store: EmbeddingStore, indexes_dir: str | Path, use_gpu: bool = False):
        self.store = store
        self.indexes_dir = Path(indexes_dir)
        self.use_gpu = use_gpu  # search through faiss on a GPU when it has one
        self._indexes: dict = {}
        self._model = None

    @classmethod
    def open(cls, store_path: str | Path, indexes_dir: str | Path, use_gpu: bool = False) -> "Archive":
        """The archive of a store, with its indexes below `indexes_dir` (a workspace's `indexes_dir`)."""
        store = EmbeddingStore(store_path)
        if not store.modalities():
            raise StoreError(located(store_path, "no embeddings yet; run `rsretrieve index --modality s1` and `--modality s2` first"))
        return cls(store, indexes_dir, use_gpu)

    # -- searching --------------------------------------------------------------------------------
    def index(self, modality: Modality):
        from rsretrieve.retrieval.faiss_index import EmbeddingIndex

        if modality not in self._indexes:
            store_id = self.store.store_id
            directory = index_dir(self.indexes_dir, self.store.path, store_id, modality)
            if not (directory.exists() and any(directory.iterdir())):
                raise StoreError(located(self.store.path, f"no {modality.upper()} index yet; run `rsretrieve index --modality {modality}` first"))
            provenance = self.store.provenance(modality)
            self._indexes[modality] = EmbeddingIndex.load(directory, expected_provenance=provenance, use_gpu=self.use_gpu, store_id=store_id)
        return self._indexes[modality]

    def search(self, vector: np.ndarray, target: Modality, k: int, exclude_row: int | None = None) -> list[Hit]:
        index = self.index(target)
        if k > index.ntotal:
            raise StoreError(located(self.store.path, f"k={k} is larger than the {target.upper()} archive ({index.ntotal} patches)"))
        extra = 1 if exclude_row is not None and k < index.ntotal else 0
        scores, rows = index.search(np.asarray(vector, np.float32).reshape(1, -1), k + extra)
        kept = [(float(score), int(row)) for score, row in zip(scores[0], rows[0]) if row >= 0 and row != exclude_row][:k]
        # the hits' coordinates in one read, not whole columns per field
        found = self.store.open(target).drop_vars("embedding").isel(patch=[row for _, row in kept]).compute()
        return [self._hit(found, i, score, row) for i, (score, row) in enumerate(kept)]

    def query_vector(self, vector: np.ndarray, source: Modality, target: Modality, k: int, label: str, pixels: RawPixels, exclude_row=None) -> QueryResult:
        return QueryResult(label, source, target, self.search(vector, target, k, exclude_row), self.store.provenance(target), pixels)

    def query_tile(self, path: str | Path, target: Modality, k: int = 10, modality: Modality | None = None) -> QueryResult:
        """Query with a tile: the mean of its valid patches' L2-normalised embeddings. The tile is
        read and embedded one row of 120 px patches at a time, so a full Sentinel tile never sits in
        memory whole."""
        from rsretrieve.datasets.tile import open_tile

        tile = open_tile(path, modality)
        self._check_target(target)
        total, count, first, skipped = self._embed_tile(tile, target)
        n = f"{count} patch{'es' if count > 1 else ''}" + (f", {skipped} skipped" if skipped else "")
        size = f"{tile.width} x {tile.height} px" + (", resized" if tile.resized else "")
        label = f"{Path(path).name} ({tile.modality.upper()}, {size}, {n})"
        return self.query_vector((total / count).astype(np.float32), tile.modality, target, k, label, first)

    def _embed_tile(self, tile, target: Modality) -> tuple[np.ndarray, int, RawPixels, int]:
        """(sum of the unit-length patch embeddings (float64), valid patches, the first valid
        patch's raw pixels, dropped patches) of a `datasets.tile.TileReader`, strip by strip."""
        total, count, first, skipped = None, 0, None, 0
        for strip in tile.iter_patches():  # DataError at the end when no patch was valid
            skipped += len(strip.skipped)
            if not len(strip.pixels):
                continue
            embeddings = self._embed(strip.pixels, tile.modality, target).astype(np.float64)
            unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
            total = unit.sum(axis=0) if total is None else total + unit.sum(axis=0)
            count += len(unit)
            first = strip.pixels.take([0]) if first is None else first
        return total, count, first, skipped

    def query_id(self, patch_id: str, target: Modality, k: int = 10, modality: Modality | None = None) -> QueryResult:
        """Query with an archive patch's stored embedding (the patch itself is left out of the results)."""
        self._check_target(target)
        for source in [modality] if modality else self.store.modalities():
            group = self.store.open(source)
            ids = np.asarray(group["patch_id"].values.tolist(), dtype=object)
            rows = np.flatnonzero(ids == patch_id)
            if rows.size:
                row = int(rows[0])
                if not bool(group["valid"][row]):
                    raise StoreError(located(self.store.path, f"patch {patch_id} was skipped when encoding (bad input); it cannot be a query"))
                vector = group["embedding"][row].values.astype(np.float32)
                pixels = self.read_pixels(source, [patch_id])
                return self.query_vector(vector, source, target, k, f"{patch_id} ({source.upper()})", pixels, exclude_row=row if source == target else None)
        raise StoreError(located(self.store.path, f"no patch with id {patch_id!r}"))

    # -- pictures ---------------------------------------------------------------------------------
    def read_pixels(self, modality: Modality, patch_ids: list[str]) -> RawPixels:
        """Raw pixels of archive patches, read back from the dataset the store was built from:
        patch by patch where the reader can, else through the chunks that hold them."""
        from rsretrieve.datasets import open_dataset

        source = self.store.provenance(modality).get("dataset") or {"name": "sample"}
        dataset = open_dataset(source["name"], Path(source["root"]) if source.get("root") else None, source.get("subset"), **source.get("options", {}))
        if hasattr(dataset, "read_patch"):
            return RawPixels.concat([dataset.read_patch(pid, modality) for pid in patch_ids])
        spans, _ = self.store.ledger(modality)
        ids = self.store.open(modality)["patch_id"].values.tolist()
        chunk_of = {ids[row]: span.key for span in spans for row in range(span.start, span.stop)}
        chunks = {chunk.key: chunk for chunk in dataset.chunks(modality)}
        found: dict[str, RawPixels] = {}
        for key in dict.fromkeys(chunk_of[pid] for pid in patch_ids):
            batch = dataset.read_chunk(chunks[key])
            found.update({pid: batch.pixels.take([i]) for i, pid in enumerate(batch.patch_ids)})
        return RawPixels.concat([found[pid] for pid in patch_ids])

    def mosaic(self, result: QueryResult, path: str | Path) -> Path:
        from rsretrieve.export.mosaic import labels_subtitle, render_mosaic

        pixels = self.read_pixels(result.target, [h.patch_id for h in result.hits])
        tiles = [
            (pixels.take([i]), result.target, f"#{h.rank} {short_id(h.patch_id)}", labels_subtitle(h.labels, h.score))
            for i, h in enumerate(result.hits)
        ]
        warning = "RANDOM WEIGHTS: not a result" if result.random_init else ""
        return render_mosaic(result.query_pixels, result.query_modality, tiles, Path(path), query_title=result.query_label, query_subtitle=warning)

    # -- internals --------------------------------------------------------------------------------
    def _check_target(self, target: Modality) -> None:
        if not self.store.has(target):
            raise StoreError(located(self.store.path, f"no {target.upper()} embeddings; run `rsretrieve index --modality {target}` first"))
        self.index(target)

    def _embed(self, pixels: RawPixels, modality: Modality, target: Modality) -> np.ndarray:
        """The query's embedding by the model that made the target's (a store holds one model),
        through the same preprocessing as the archive's patches."""
        from rsretrieve.models.inference import embed_raw, model_for_provenance

        if self._model is None:
            self._model = model_for_provenance(self.store.provenance(target))
        return embed_raw(self._model, pixels, modality)

    @staticmethod
    def _hit(found, i: int, score: float, row: int) -> Hit:
        """Hit number i of the hits' coordinates `found` (already selected and loaded)."""

        def coord(name, default=None):
            return found[name].values[i] if name in found.coords else default

        lat, lon = coord("lat"), coord("lon")
        return Hit(
            rank=i + 1,
            patch_id=str(coord("patch_id", row)),
            pair_id=str(coord("pair_id", "")),
            score=score,
            labels=[CLASSES[j] for j in np.flatnonzero(coord("labels", np.zeros(len(CLASSES), bool)))],
            split=str(coord("split", "")),
            lat=None if lat is None else float(lat),
            lon=None if lon is None else float(lon),
            row=row,
        )
