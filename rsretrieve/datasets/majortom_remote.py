"""Major TOM Core shards where they live (a root given as a URL: `s3://`, `gs://`, `https://`, `hf://`,
any fsspec protocol), read by byte ranges through `rsretrieve.io.remote`.

- Shards are found by listing, as on a disk (`<collection>/images/*.parquet`, else
  `<collection>/*.parquet`), where the collection is the root itself when its name holds the tag
  (`S2L2A`, `S1RTC`), else an entry of the root whose name does, else `<root>/Core-<tag>`. Where
  nothing can be listed (an HTTP host without index pages, such as Hugging Face's `resolve/` URLs),
  the shards are those the collection's `metadata.parquet` names in `parquet_url`, taken relative
  to the collection (`images/<file>`), so a mirror serves its own copies; only that column is read.
- A parquet file is read through a `RangedFile`: the footer (one or two ranged reads, once per
  process), then per chunk the needed columns of one row group (pyarrow's `pre_buffer` coalesces
  them into one or two requests). The thumbnail, B01, B09 and cloud mask cells are not fetched
  (unless under 8 KB between needed columns: pyarrow then reads through the hole).
- Listing the chunks needs each tile's size and georeference, from the GeoTIFF header of its first
  band cell: that cell is fetched whole (about a tenth of an S2 tile, half of an S1 one), several
  tiles at once. What it yields (each window's ids, lat/lon, ...) is kept on local disk per shard
  (`cache_dir()`, keyed by the shard's URL, size and ETag/Last-Modified, and the reader's settings),
  so a later `index` or `encode` over the same data fetches only the shards' footers.
- Chunks hold the shard's URL, a plain string; workers reopen it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rsretrieve.errors import DataError, located
from rsretrieve.io import remote

HEADER_READS = 8  # tiles whose headers are fetched at once when listing the chunks of a remote root
CACHE_ENV = "RSRETRIEVE_CACHE"  # the cache folder; "off" keeps nothing
CACHE_FORMAT = 1


def find_shards(root: str, tag: str) -> list[str]:
    """URLs of a collection's parquet shards under a root URL, sorted (module docstring)."""
    name = root.rstrip("/").rsplit("/", 1)[-1]
    candidates = [root.rstrip("/")] if tag in name else []
    candidates += [u for u in remote.entries(root) if tag in u.rsplit("/", 1)[-1]]
    candidates.append(remote.join(root, f"Core-{tag}"))
    for collection in dict.fromkeys(candidates):
        shards = remote.glob(collection, "images/*.parquet") or \
            [u for u in remote.glob(collection, "*.parquet") if not u.endswith("/metadata.parquet")] or named_shards(collection)
        if shards:
            return shards
    return []


def named_shards(collection: str) -> list[str]:
    """The shards a collection's metadata.parquet names (`parquet_url`), relative to the collection;
    [] without such a file."""
    url = remote.join(collection, "metadata.parquet")
    try:
        f = pq.ParquetFile(remote.RangedFile(url), pre_buffer=True)
        if "parquet_url" not in f.schema_arrow.names:
            return []
        names = f.read(columns=["parquet_url"]).column("parquet_url").unique().to_pylist()
    except remote.NotFound:
        return []
    except (pa.ArrowException, OSError) as exc:
        raise DataError(located(url, f"unreadable parquet ({remote.one_line(exc)})")) from None
    out = set()
    for n in filter(None, names):
        if "/images/" in f"/{n}":  # Major TOM's own: https://huggingface.co/.../resolve/main/images/part_00001.parquet
            out.add(remote.join(collection, "images", n.rsplit("/", 1)[-1]))
        else:
            out.add(n if remote.is_url(n) else remote.join(collection, n))
    return sorted(out)


def source(path: str | Path):
    """What pyarrow reads a shard from: the local path, or a ranged file over the URL."""
    return remote.RangedFile(path) if remote.is_url(path) else path


def column(path: str | Path, meta: pq.FileMetaData, name: str) -> pa.ChunkedArray:
    """One column of every row group. Over a URL, the column's chunks are fetched together (one
    concurrent batch of ranged requests, not one request after another)."""
    src = source(path)
    if isinstance(src, remote.RangedFile):
        i = meta.schema.names.index(name)
        spans = []
        for rg in range(meta.num_row_groups):
            col = meta.row_group(rg).column(i)
            start = col.dictionary_page_offset if col.has_dictionary_page and col.dictionary_page_offset else col.data_page_offset
            spans.append((start, start + col.total_compressed_size))
        src.prefetch(spans)
    return pq.ParquetFile(src, metadata=meta).read(columns=[name]).column(name)


def row_group(path: str | Path, meta: pq.FileMetaData, rg: int, columns: list[str]) -> pa.Table:
    """Some columns of one row group; over a URL, pyarrow coalesces them into few ranged reads."""
    remote_file = remote.is_url(path)
    return pq.ParquetFile(source(path), metadata=meta, pre_buffer=remote_file).read_row_group(rg, columns=columns)


def cache_dir() -> Path | None:
    """Where the chunk listings of remote shards are kept: $RSRETRIEVE_CACHE, else
    $XDG_CACHE_HOME/rsretrieve, else ~/.cache/rsretrieve; None when $RSRETRIEVE_CACHE is "off"."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rsretrieve"


def _cache_file(shard: str, settings: dict) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    key = json.dumps([CACHE_FORMAT, shard, remote.version(shard), settings], sort_keys=True, default=str)
    return folder / "majortom-chunks" / f"{hashlib.sha256(key.encode()).hexdigest()}.parquet"


def candidates(chunks: list, read: Callable, settings: dict) -> dict[str, pa.Table]:
    """{chunk key: candidate windows} of remote chunks: from the local cache of each shard's listing
    when it is current, else `read(chunk)` (a header-only `PatchBatch`), several tiles at once; a
    shard whose every tile was read cleanly is then cached."""
    from concurrent.futures import ThreadPoolExecutor

    from rsretrieve.io.files import atomic_write

    by_shard: dict[str, list] = {}
    for chunk in chunks:
        by_shard.setdefault(chunk.path, []).append(chunk)
    out: dict[str, pa.Table] = {}
    todo = []
    for shard, group in by_shard.items():
        path = _cache_file(shard, settings)
        try:
            table = pq.read_table(path) if path is not None and path.exists() else None
        except (pa.ArrowException, OSError):
            table = None  # a damaged cache entry is read again
        if table is not None and "_row_group" in table.column_names:
            rows = table.column("_row_group").to_numpy()
            rest = table.drop_columns(["_row_group"])
            out.update({c.key: rest.filter(pa.array(rows == c.row_group)) for c in group})
        else:
            todo.append((shard, group, path))
    if not todo:
        return out
    heads = [group[0] for _, group, _ in todo]  # one tile per shard first: its footer and tile keys, once
    tails = [c for _, group, _ in todo for c in group[1:]]
    with ThreadPoolExecutor(HEADER_READS) as pool:
        got = dict(zip([c.key for c in heads], map(read, heads))) | dict(zip([c.key for c in tails], pool.map(read, tails)))
    failed = [c for c in heads + tails if got[c.key].skipped and not len(got[c.key])]
    for chunk in failed:  # perhaps a passing network failure: stop if the host is gone, else try once more
        remote.probe(chunk.path)
        got[chunk.key] = read(chunk)
    for shard, group, path in todo:
        out.update({c.key: got[c.key].meta for c in group})
        if path is None or any(got[c.key].skipped for c in group):
            continue  # a tile that failed is read again next time
        tables = [got[c.key].meta.append_column("_row_group", pa.array([c.row_group] * got[c.key].meta.num_rows, pa.int32())) for c in group]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            sink = pa.BufferOutputStream()
            pq.write_table(pa.concat_tables(tables, promote_options="default"), sink)
            atomic_write(path, sink.getvalue().to_pybytes())
        except (OSError, pa.ArrowException):
            pass  # no cache (a read-only home): the next run reads the headers again
    return out
