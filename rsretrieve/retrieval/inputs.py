"""Query arguments to query tiles and patch ids: files, folders, glob patterns, lists on stdin or in
a file, as `rsretrieve query` takes them (and a notebook may).

- a file is one tile; a BigEarthNet patch folder (`<name>/<name>_B02.tif` ... or `_VV.tif`) is one tile;
- any other folder is every `*.tif`/`*.tiff` directly in it plus the patch folders directly in it,
  in name order (not recursive: a product folder of BigEarthNet gives its patches);
- a pattern with `*`, `?` or `[` that names no file is expanded here (the shell did not), sorted;
  each match counts as if it had been given; `**` goes down folders, each real folder once (a
  symlink loop is not followed round: `glob.glob(recursive=True)` walked one forever);
- `-` reads one path (or pattern, or folder) per line from stdin; blank lines are skipped;
- patch ids come from `--id` (repeatable) and an ids file (`-`: stdin), one a line, # comments skipped.

An argument that names nothing (no such path, a pattern matching nothing, a folder without tiles) is
refused up front with one line: a typo is likelier than a wish to go on, and nothing has run yet.
The same tile named twice is queried once. Reading a tile that exists is the query's business.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rsretrieve.bands import S1_BANDS, S2_BANDS
from rsretrieve.errors import RSRetrieveError, located

TILE_SUFFIXES = (".tif", ".tiff")
STDIN = "-"


@dataclass
class QueryInputs:
    tiles: list[Path] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    batch: bool = False  # given as a batch (several, a folder of tiles, a pattern, stdin, an ids file)

    def __len__(self) -> int:
        return len(self.tiles) + len(self.ids)


def is_patch_folder(path: Path) -> bool:
    """Whether `path` is a BigEarthNet patch folder: `datasets.tile` reads it as one tile."""
    name = path.name
    return path.is_dir() and any((path / f"{name}_{band}.tif").is_file() for band in (*S1_BANDS, *S2_BANDS))


def tiles_in_folder(folder: Path) -> list[Path]:
    """The GeoTIFFs and patch folders directly in a folder that is not itself a patch folder."""
    found = [p for p in folder.iterdir() if not p.name.startswith(".")
             and ((p.is_file() and p.suffix.lower() in TILE_SUFFIXES) or is_patch_folder(p))]
    return sorted(found, key=lambda p: p.name)


def _is_pattern(arg: str) -> bool:
    return any(ch in arg for ch in "*?[") and not Path(arg).exists()


def _folders_below(folder: str, seen: set[str]) -> Iterator[str]:
    """`folder` and every folder below it (symlinks followed), hidden ones left out, each real
    folder once: a symlink loop, or two links to one folder, is walked once."""
    stack = [folder]
    while stack:
        current = stack.pop()
        real = os.path.realpath(current or ".")
        if real in seen:
            continue
        seen.add(real)
        yield current
        try:
            entries = sorted(os.scandir(current or "."), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        stack += [os.path.join(current, e.name) for e in entries if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _matches(folder: str, parts: list[str], seen: set[str]) -> Iterator[str]:
    """The paths under `folder` that the pattern's remaining `parts` match, as glob spells them."""
    if not parts:
        yield folder
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        for below in _folders_below(folder, seen):
            yield from _matches(below, rest, seen)
            if not rest:  # a trailing ** matches files too
                yield from (os.path.join(below, e.name) for e in _scan(below) if not e.name.startswith(".") and not _is_dir(e))
    elif glob.has_magic(part):
        for entry in _scan(folder):
            if fnmatch.fnmatch(entry.name, part) and (part.startswith(".") or not entry.name.startswith(".")) \
                    and (not rest or _is_dir(entry)):
                yield from _matches(os.path.join(folder, entry.name), rest, seen)
    elif os.path.lexists(path := os.path.join(folder, part)) and (not rest or os.path.isdir(path)):
        yield from _matches(path, rest, seen)


def _scan(folder: str) -> list[os.DirEntry]:
    try:
        return sorted(os.scandir(folder or "."), key=lambda e: e.name)
    except OSError:
        return []


def expand_pattern(pattern: str) -> list[str]:
    """The paths a pattern matches, sorted, as `glob.glob(pattern, recursive=True)` gives them, but
    `**` follows each real folder once, so a symlink loop ends."""
    if "**" not in pattern:
        return sorted(glob.glob(pattern))  # each part one folder deep: bounded
    anchor, *parts = Path(pattern).parts if Path(pattern).is_absolute() else ("", *Path(pattern).parts)
    return sorted(set(_matches(anchor, parts, set())))


def expand_tile_arg(arg: str) -> tuple[list[Path], bool]:
    """(the tiles an argument names, whether it named a batch), or a one-line RSRetrieveError."""
    if _is_pattern(arg):
        matches = expand_pattern(arg)
        if not matches:
            raise RSRetrieveError(located(arg, "no file or folder matches this pattern"))
        return [tile for match in matches for tile in expand_tile_arg(match)[0]], True
    path = Path(arg)
    if not path.exists():
        raise RSRetrieveError(located(arg, "no such file or folder"))
    if not path.is_dir() or is_patch_folder(path):
        return [path], False
    tiles = tiles_in_folder(path)
    if not tiles:
        raise RSRetrieveError(located(arg, "no *.tif, *.tiff or BigEarthNet patch folder in this folder"))
    return tiles, True


def read_lines(stream: TextIO, skip_comments: bool = False) -> list[str]:
    lines = (line.strip() for line in stream)
    return [line for line in lines if line and not (skip_comments and line.startswith("#"))]


def read_ids_file(path: str | Path) -> list[str]:
    """Patch ids, one a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise RSRetrieveError(located(path, "no such file (--ids-file)"))
    try:
        with path.open(encoding="utf-8") as stream:
            ids = read_lines(stream, skip_comments=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise RSRetrieveError(located(path, f"unreadable ids file ({exc})")) from None
    if not ids:
        raise RSRetrieveError(located(path, "holds no patch id"))
    return ids


def collect_queries(args: Iterable[str] = (), ids: Iterable[str] = (), ids_file: str | Path | None = None,
                    stdin: TextIO | None = None) -> QueryInputs:
    """Every query the arguments name, in order: tiles, or patch ids (not both)."""
    args, ids = list(args), list(ids)
    if ids_file is not None and str(ids_file) == STDIN:
        ids += _stdin_lines(stdin, "patch ids", skip_comments=True)
    elif ids_file is not None:
        ids += read_ids_file(ids_file)
    if args and ids:
        raise RSRetrieveError("query: give TILEs or --id/--ids-file, not both")
    if not args and not ids:
        raise RSRetrieveError("query: give a TILE (file, folder, pattern or - for stdin), --id PATCH_ID or --ids-file FILE")
    batch = len(args) + len(ids) > 1 or ids_file is not None
    tiles: list[Path] = []
    for arg in args:
        if arg == STDIN:
            named, batch = _from_stdin(stdin), True
        else:
            named, many = expand_tile_arg(arg)
            batch = batch or many
        tiles += named
    return QueryInputs(list(dict.fromkeys(tiles)), list(dict.fromkeys(ids)), batch)


def _stdin_lines(stdin: TextIO | None, what: str, skip_comments: bool = False) -> list[str]:
    if stdin is None or stdin.isatty():
        raise RSRetrieveError(f"-: reads {what} from stdin, one a line, but stdin is a terminal; pipe a list in")
    lines = read_lines(stdin, skip_comments)
    if not lines:
        raise RSRetrieveError(f"-: stdin held no {what}")
    return lines


def _from_stdin(stdin: TextIO | None) -> list[Path]:
    return [tile for line in _stdin_lines(stdin, "tile paths") for tile in expand_tile_arg(line)[0]]


__all__ = ["QueryInputs", "collect_queries", "expand_tile_arg", "is_patch_folder", "read_ids_file", "tiles_in_folder"]
