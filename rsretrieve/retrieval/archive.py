"""Querying an archive: a store plus its per-modality FAISS indexes.

    archive = Archive.open("rsretrieve-workspace/stores/sample--csmoe-p16.zarr", "rsretrieve-workspace/indexes")
    result = archive.query_tile("tile.tif", target="s2", k=10)
    archive.mosaic(result, "mosaic.png")
    results = archive.query_tiles(paths, target="s2", k=10, skip_bad=True)   # one model load, one faiss search
    results.to_dataframe()                                                     # one row per (query, rank)

A tile with several 120 px patches is embedded patch by patch; the query vector is the mean of the
patches' L2-normalised embeddings (the centroid direction of the tile), documented in docs/DATASETS.md.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsretrieve.bands import Modality
from rsretrieve.errors import DataError, StoreError, located
from rsretrieve.labels import CLASSES
from rsretrieve.pixels import RawPixels
from rsretrieve.retrieval.index_meta import index_dir
from rsretrieve.retrieval.results import Hit, QueryResult, QueryResults, QueryStats, short_id
from rsretrieve.store.integrity import naming_damage
from rsretrieve.store.zarr_store import EmbeddingStore


class Archive:
    """A store's embeddings and indexes, with the model that made them, ready for queries. The
    model and each index load once, on first use, and serve every later query of this object."""

    def __init__(self, store: EmbeddingStore, indexes_dir: str | Path, use_gpu: bool = False):
        self.store = store
        self.indexes_dir = Path(indexes_dir)
        self.use_gpu = use_gpu  # search through faiss on a GPU when it has one
        self._indexes: dict = {}
        self._model = None
        self.stats = QueryStats()

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
            # an ivfpq-disk index maps its lists (instant) and re-ranks with vectors read from the store
            index = EmbeddingIndex.load(directory, expected_provenance=provenance, use_gpu=self.use_gpu, store_id=store_id,
                                        store_path=self.store.path)
            self._check_fresh(index, modality, directory)
            self._indexes[modality] = index
        return self._indexes[modality]

    def _check_fresh(self, index, modality: Modality, directory: Path) -> None:
        """An index built before the store gained patches (a resumed encode, --retry-skipped) would
        never return them: say so instead of answering from it."""
        encoded = self.store.valid_count(modality)
        if index.ntotal != encoded and index.selection.get("rows") is None and index.selection.get("split") is None:
            raise StoreError(located(directory, f"index is stale: it holds {index.ntotal} vectors, the store {encoded} encoded "
                                                f"{modality.upper()} patches; run `rsretrieve index --modality {modality}`"))

    def search(self, vectors: np.ndarray, target: Modality, k: int, exclude_row: int | None = None) -> list:
        """The top-k hits of one vector (D,) -> list[Hit], or of each row of (N, D) -> N lists
        (through `search_many`: one faiss call)."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim == 2:
            return self.search_many(vectors, target, k, None if exclude_row is None else [exclude_row] * len(vectors))
        return self.search_many(vectors.reshape(1, -1), target, k, [exclude_row])[0]

    def search_many(self, vectors: np.ndarray, target: Modality, k: int, exclude_rows: Sequence[int | None] | None = None) -> list[list[Hit]]:
        """The top-k hits of each row of `vectors` (N, D), in one faiss search for all rows; the
        hits' labels and coordinates in one store read. `exclude_rows[i]` (a store row, or None) is
        left out of row i's hits: a stored patch used as its own query. A k larger than the archive
        gives what it holds (`short_note` says so)."""
        index = self.index(target)
        k = min(k, index.ntotal)
        vectors = np.atleast_2d(np.asarray(vectors, np.float32))  # a wrong width is the index's ValueError, not a reshape
        if not vectors.size:
            return []
        excluded = list(exclude_rows) if exclude_rows is not None else [None] * len(vectors)
        if len(excluded) != len(vectors):
            raise ValueError(f"exclude_rows has {len(excluded)} entries for {len(vectors)} query vectors")
        t0 = time.perf_counter()
        extra = 1 if any(r is not None for r in excluded) and k < index.ntotal else 0
        scores, rows = index.search(vectors, k + extra)  # one call for every query
        self.stats.faiss_searches += 1
        kept = [[(float(s), int(r)) for s, r in zip(line_s, line_r) if r >= 0 and r != skip][:k]
                for line_s, line_r, skip in zip(scores, rows, excluded)]
        wanted = sorted({row for hits in kept for _, row in hits})
        with naming_damage(self.store.path):
            found = self.store.open(target, index=False).drop_vars("embedding").isel(patch=wanted).compute()
        at = {row: i for i, row in enumerate(wanted)}
        hits = [[self._hit(found, at[row], rank, score, row) for rank, (score, row) in enumerate(line, start=1)] for line in kept]
        self.stats.search_s += time.perf_counter() - t0
        return hits

    def short_note(self, target: Modality, k: int, hits: Sequence[Sequence[Hit]]) -> str | None:
        """A one-line note when queries got fewer than `k` results because the archive is smaller
        (its own patch left out of a stored patch's results counts too), else None."""
        n = self.index(target).ntotal
        got = max((len(line) for line in hits), default=0)
        if k < n or got >= k:
            return None
        own = " (a query's own patch is left out of its results)" if got < min(k, n) else ""
        return (f"the archive holds {n} {target.upper()} patch{'es' if n != 1 else ''}; returning {got} "
                f"result{'s' if got != 1 else ''}, not {k}{own}")

    def query_vector(self, vector: np.ndarray, source: Modality, target: Modality, k: int, label: str, pixels: RawPixels | None = None,
                     exclude_row=None) -> QueryResult:
        return QueryResult(label, source, target, self.search(vector, target, k, exclude_row), self.store.provenance(target), pixels)

    def query_tile(self, path: str | Path, target: Modality, k: int = 10, modality: Modality | None = None) -> QueryResult:
        """Query with a tile: the mean of its valid patches' L2-normalised embeddings. The tile is
        read and embedded one row of 120 px patches at a time, so a full Sentinel tile never sits in
        memory whole."""
        return self.query_tiles([path], target, k, modality, keep_pixels=True)[0]

    def query_tiles(self, paths: Sequence[str | Path], target: Modality, k: int = 10, modality: Modality | None = None, *,
                    skip_bad: bool = False, keep_pixels: bool = False, batch_size: int = 32) -> QueryResults:
        """Query with many tiles (GeoTIFFs or patch folders): the model loads once, patches of
        several tiles share its batches, and one faiss search serves them all. A tile that cannot
        be read or has no valid patch raises a DataError, or with `skip_bad` is left out and named
        in the result's `failed`. `keep_pixels` keeps each query's first patch (for mosaics;
        `mosaic` reads it again otherwise)."""
        from rsretrieve.retrieval.tile_batch import embed_tiles

        paths = list(paths)
        self._check_target(target)
        t0, model_before = time.perf_counter(), self.stats.model_s
        tiles, failed = embed_tiles(paths, lambda pixels, mod: self._embed(pixels, mod, target), modality,
                                    batch_size=batch_size, keep_first=keep_pixels, skip_bad=skip_bad)
        self.stats.embed_s += time.perf_counter() - t0 - (self.stats.model_s - model_before)
        done = [(path, tile) for path, tile in zip(paths, tiles) if tile is not None]
        vectors = np.stack([tile.vector for _, tile in done]) if done else np.zeros((0, 1), np.float32)
        hits = self.search_many(vectors, target, k)
        provenance = self.store.provenance(target)
        results = [QueryResult(tile.label, tile.modality, target, found, provenance, tile.first, str(path), "tile",
                               tile_footprint(path, tile.modality)) for (path, tile), found in zip(done, hits)]
        return QueryResults(results, failed, self._notes(target, k, hits, bool(results)))

    def query_id(self, patch_id: str, target: Modality, k: int = 10, modality: Modality | None = None) -> QueryResult:
        """Query with an archive patch's stored embedding (the patch itself is left out of the results)."""
        return self.query_ids([patch_id], target, k, modality, keep_pixels=True)[0]

    def query_ids(self, patch_ids: Sequence[str], target: Modality, k: int = 10, modality: Modality | None = None, *,
                  skip_bad: bool = False, keep_pixels: bool = False) -> QueryResults:
        """Query with archive patches' stored embeddings (each patch is left out of its own
        results), in one faiss search. An unknown id, or one skipped when encoding, raises a
        StoreError, or with `skip_bad` is left out and named in the result's `failed`."""
        self._check_target(target)
        t0 = time.perf_counter()
        found, failed = self._locate_ids(patch_ids, modality)
        if failed and not skip_bad:
            raise StoreError(failed[0][1])
        vectors = self._stored_vectors(found)
        self.stats.embed_s += time.perf_counter() - t0
        hits = self.search_many(vectors, target, k, [row if source == target else None for _, source, row in found])
        provenance = self.store.provenance(target)
        results = [QueryResult(f"{pid} ({source.upper()})", source, target, h, provenance,
                               self.read_pixels(source, [pid]) if keep_pixels else None, pid, "id", shape)
                   for (pid, source, _), h, shape in zip(found, hits, self._stored_footprints(found))]
        return QueryResults(results, failed, self._notes(target, k, hits, bool(results)))

    def _locate_ids(self, patch_ids: Sequence[str], modality: Modality | None) -> tuple[list[tuple[str, Modality, int]], list[tuple[str, str]]]:
        """((id, modality, store row) of each id found, in order; (id, one-line reason) of the others).
        Each group's ids are scanned once (a slab at a time), whatever the number of queries."""
        where: dict[str, tuple[Modality, int, bool]] = {}
        for source in [modality] if modality else self.store.modalities():
            rows = {pid: row for pid, row in self.store.rows_of(source, patch_ids).items() if pid not in where}
            ordered = sorted(rows.values())
            valid = dict(zip(ordered, self.store.open(source, index=False)["valid"].isel(patch=ordered).values.tolist())) if ordered else {}
            where.update({pid: (source, row, bool(valid[row])) for pid, row in rows.items()})
        found, failed = [], []
        for pid in patch_ids:
            if pid not in where:
                failed.append((pid, located(self.store.path, f"no patch with id {pid!r}")))
            elif not where[pid][2]:
                failed.append((pid, located(self.store.path, f"patch {pid} was skipped when encoding (bad input); it cannot be a query")))
            else:
                found.append((pid, *where[pid][:2]))
        return found, failed

    def _stored_vectors(self, found: list[tuple[str, Modality, int]]) -> np.ndarray:
        """The stored embeddings of (id, modality, row), in order: one read per modality."""
        out: list[np.ndarray | None] = [None] * len(found)
        for source in dict.fromkeys(mod for _, mod, _ in found):
            picks = [(i, row) for i, (_, mod, row) in enumerate(found) if mod == source]
            rows = sorted({row for _, row in picks})
            with naming_damage(self.store.path):
                block = self.store.open(source, index=False)["embedding"].isel(patch=rows).values.astype(np.float32)
            at = {row: j for j, row in enumerate(rows)}
            for i, row in picks:
                out[i] = block[at[row]]
        return np.stack(out) if out else np.zeros((0, 1), np.float32)

    def _stored_footprints(self, found: list[tuple[str, Modality, int]]) -> list:
        """WGS84 footprints of stored patches (id, modality, row), in order (None without coordinates):
        their centres read once per modality, squared by `rsretrieve.geo.patch_footprints`."""
        from rsretrieve.geo import patch_footprints

        lats, lons = np.full(len(found), np.nan), np.full(len(found), np.nan)
        for source in dict.fromkeys(mod for _, mod, _ in found):
            group = self.store.open(source, index=False)
            if "lat" not in group.coords or "lon" not in group.coords:
                continue
            picks = [(i, row) for i, (_, mod, row) in enumerate(found) if mod == source]
            rows = sorted({row for _, row in picks})
            at = np.searchsorted(rows, [row for _, row in picks])
            lats[[i for i, _ in picks]] = group["lat"].isel(patch=rows).values[at]
            lons[[i for i, _ in picks]] = group["lon"].isel(patch=rows).values[at]
        return patch_footprints(lats, lons, [pid for pid, _, _ in found]).wgs84.tolist() if found else []

    # -- pictures ---------------------------------------------------------------------------------
    def read_pixels(self, modality: Modality, patch_ids: list[str]) -> RawPixels:
        """Raw pixels of archive patches, read back from the dataset the store was built from:
        patch by patch where the reader can, else through the chunks that hold them."""
        from rsretrieve.datasets import open_dataset

        source = self.store.provenance(modality).get("dataset") or {"name": "sample"}
        dataset = open_dataset(source["name"], source.get("root") or None, source.get("subset"), **source.get("options", {}))
        if hasattr(dataset, "read_patch"):
            return _pictures([dataset.read_patch(pid, modality) for pid in patch_ids])
        chunk_of = self._chunk_keys(modality, patch_ids)
        chunks = {chunk.key: chunk for chunk in dataset.chunks(modality)}
        found: dict[str, RawPixels] = {}
        for key in dict.fromkeys(chunk_of[pid] for pid in patch_ids):
            batch = dataset.read_chunk(chunks[key])
            found.update({pid: batch.pixels.take([i]) for i, pid in enumerate(batch.patch_ids)})
        return _pictures([found[pid] for pid in patch_ids])

    def _chunk_keys(self, modality: Modality, patch_ids: list[str]) -> dict[str, str]:
        """{patch id: key of the data chunk holding it}, from the ledger's row ranges (vectorised:
        an archive of 10^8 rows is not turned into a dict)."""
        spans, _ = self.store.ledger(modality)
        rows = self.store.rows_of(modality, patch_ids)
        starts = np.array([span.start for span in spans], dtype=np.int64)
        owner = np.searchsorted(starts, np.fromiter(rows.values(), np.int64, len(rows)), side="right") - 1
        return {pid: spans[i].key for pid, i in zip(rows, owner.tolist())}

    def query_pixels(self, result: QueryResult) -> RawPixels:
        """The query's (first valid) patch, raw: kept in the result, else read again."""
        if result.query_pixels is not None:
            return result.query_pixels
        if result.kind == "id":
            return self.read_pixels(result.query_modality, [result.source])
        from rsretrieve.datasets.tile import open_tile

        strips = open_tile(result.source, result.query_modality).iter_patches()
        return next(strip.pixels.take([0]) for strip in strips if len(strip.pixels))

    def mosaic(self, result: QueryResult, path: str | Path) -> Path:
        from rsretrieve.export.mosaic import labels_subtitle, render_mosaic

        pixels = self.read_pixels(result.target, [h.patch_id for h in result.hits])
        tiles = [
            (pixels.take([i]), result.target, f"#{h.rank} {short_id(h.patch_id)}", labels_subtitle(h.labels, h.score))
            for i, h in enumerate(result.hits)
        ]
        warning = "RANDOM WEIGHTS: not a result" if result.random_init else ""
        return render_mosaic(self.query_pixels(result), result.query_modality, tiles, Path(path), query_title=result.query_label,
                             query_subtitle=warning)

    def map_page(self, results: Sequence[QueryResult], path: str | Path) -> Path:
        """One self-contained HTML page (`rsretrieve.export.map_page`): per query, a map of its
        footprint and its hits', beside their thumbnails, scores and labels. The hits' pixels are
        read in one call per target modality."""
        from rsretrieve.retrieval.results import save_map_page

        found = {}
        for target in dict.fromkeys(r.target for r in results):
            ids = list(dict.fromkeys(h.patch_id for r in results if r.target == target for h in r.hits))
            pixels = self.read_pixels(target, ids) if ids else None
            found.update({(target, pid): pixels.take([i]) for i, pid in enumerate(ids)})
        pictures = [(self.query_pixels(r), [found[(r.target, h.patch_id)] for h in r.hits]) for r in results]
        return save_map_page(results, path, pictures)

    # -- internals --------------------------------------------------------------------------------
    def _notes(self, target: Modality, k: int, hits, any_results: bool) -> list[str]:
        """One line each: why --gpu-search searched on the CPU, and results short of k."""
        notes = [self.index(target).gpu_notice] if self.use_gpu else []
        notes.append(self.short_note(target, k, hits) if any_results else None)
        return [note for note in notes if note]

    def _check_target(self, target: Modality) -> None:
        if not self.store.has(target):
            raise StoreError(located(self.store.path, f"no {target.upper()} embeddings; run `rsretrieve index --modality {target}` first"))
        self.index(target)

    def _embed(self, pixels: RawPixels, modality: Modality, target: Modality) -> np.ndarray:
        """The query's embedding by the model that made the target's (a store holds one model),
        through the same preprocessing as the archive's patches. The model loads on the first
        call and stays for every later query."""
        from rsretrieve.models.inference import embed_raw, model_for_provenance

        if self._model is None:
            t0 = time.perf_counter()
            self._model = model_for_provenance(self.store.provenance(target))
            self.stats.model_loads += 1
            self.stats.model_s += time.perf_counter() - t0
        return embed_raw(self._model, pixels, modality)

    @staticmethod
    def _hit(found, i: int, rank: int, score: float, row: int) -> Hit:
        """The hit at position i of the hits' coordinates `found` (already selected and loaded)."""

        def coord(name, default=None):
            return found[name].values[i] if name in found.coords else default

        lat, lon = coord("lat"), coord("lon")
        return Hit(
            rank=rank,
            patch_id=str(coord("patch_id", row)),
            pair_id=str(coord("pair_id", "")),
            score=score,
            labels=[CLASSES[j] for j in np.flatnonzero(coord("labels", np.zeros(len(CLASSES), bool)))],
            split=str(coord("split", "")),
            lat=None if lat is None else float(lat),
            lon=None if lon is None else float(lon),
            row=row,
        )


def tile_footprint(path: str | Path, modality: Modality | None = None):
    """A query tile's outline in WGS84 (shapely Polygon, lon/lat, counterclockwise): its raster's
    bounds in its own CRS, each edge cut in 4 and taken over with `rasterio.warp.transform_geom`; None
    for a tile without a CRS or one PROJ cannot take to WGS84. Reads the header only (a patch folder:
    its one small patch)."""
    import shapely
    from rasterio.warp import transform_geom

    from rsretrieve.datasets.tile import open_tile
    from rsretrieve.geo import pixel_to_xy

    try:
        reader = open_tile(path, modality)
    except DataError:  # gone since it was embedded: the query stands, without a footprint
        return None
    if reader.crs is None:
        return None
    w, h = reader.width, reader.height
    ring = shapely.Polygon([pixel_to_xy(reader.transform, c, r) for c, r in ((0, 0), (w, 0), (w, h), (0, h))])
    dense = shapely.segmentize(ring, ring.length / 16)
    try:
        mapped = transform_geom(reader.crs, "EPSG:4326", shapely.geometry.mapping(dense))
    except Exception:  # a CRS PROJ cannot take to WGS84: the tile has no footprint, as it has no coordinates
        return None
    return shapely.orient_polygons(shapely.geometry.shape(mapped))


__all__ = ["Archive", "Hit", "QueryResult", "QueryResults", "short_id", "tile_footprint"]


def _pictures(parts: list[RawPixels]) -> RawPixels:
    """One batch of patches for pictures: as read, or, when their bands are laid out differently
    (20 m bands at 60 px in some, on the 10 m grid in others), every band on the 10 m grid."""
    try:
        return RawPixels.concat(parts)
    except ValueError:
        return RawPixels.concat([RawPixels(p.stacked(parts[0].bands), parts[0].bands) for p in parts])
