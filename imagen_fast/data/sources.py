"""Where raw samples come from: tar shards (webdataset / img2dataset layout) and folders.

A source is a list of *units* (a shard, or one file group of a folder) and a way to read the
raw records of a unit: ``Record(key, fields)`` where ``fields`` maps a lower-case extension
('jpg', 'txt', 'json', ...) to bytes, a path, or a ready PIL image. Decoding happens later,
after the split across ranks/workers and the shuffle buffer.

Tar shards: members are grouped webdataset-style by key = the member path up to the first dot
of its base name (``00000/000000012.jpg`` and ``00000/000000012.txt`` form one sample);
read with the standard library's ``tarfile`` (plain or gzip/bz2/xz-compressed tars).
"""
from __future__ import annotations

import glob
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass
class Record:
    key: str
    fields: Dict[str, object]
    origin: str = ""          # shard or folder it came from (for messages)


class UnreadableUnit(Exception):
    """A shard could not be opened or read to its end (records before the error were kept)."""


def expand_brace(pattern: str) -> List[str]:
    """``"a/{000..002}.tar"`` -> ``["a/000.tar", "a/001.tar", "a/002.tar"]`` (zero padding kept)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_brace(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():])
    return out


def expand_shards(spec: Union[str, os.PathLike, Sequence]) -> List[str]:
    """Shard paths from a directory (its *.tar, *.tar.gz, *.tgz, sorted), a glob, a brace
    range (``data/{00000..00099}.tar``), a '::'-separated list of those, or a list."""
    if isinstance(spec, (list, tuple)):
        out: List[str] = []
        for s in spec:
            out += expand_shards(s)
        return out
    spec = os.fspath(spec)
    if "::" in spec:
        return expand_shards(spec.split("::"))
    if os.path.isdir(spec):
        found = [str(p) for p in sorted(Path(spec).iterdir())
                 if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz"))]
        if not found:
            raise FileNotFoundError(f"shards: no .tar files in the directory {spec}")
        return found
    out = []
    for p in expand_brace(spec):
        out += sorted(glob.glob(p)) if glob.has_magic(p) else [p]
    if not out:
        raise FileNotFoundError(f"shards: {spec!r} matches no file")
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shards: {len(missing)} of {len(out)} shards do not exist, "
                                f"e.g. {missing[0]!r}")
    return out


def _split_key(name: str):
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


class TarShards:
    """Source over tar shards: one unit per shard."""

    granularity = "shard"

    def __init__(self, spec):
        self.shards = expand_shards(spec)

    def num_units(self) -> int:
        return len(self.shards)

    def describe(self) -> str:
        return f"{len(self.shards)} tar shards ({self.shards[0]} ...)"

    def records(self, unit: int, on_error: Optional[Callable[[str, str], None]] = None) -> Iterator[Record]:
        """Records of shard ``unit`` in file order. An error part way (truncated or corrupt
        tar, I/O error) ends the shard: ``on_error(shard, message)`` is called, the samples
        before it are kept, the incomplete one is dropped. ``tarfile`` alone ends a truncated
        archive silently; here a shard must end with its end-of-archive block, or it counts
        as unreadable (never a silent hole)."""
        path = self.shards[unit]
        cur_key, cur = None, {}
        try:
            with tarfile.open(path, mode="r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if key is None or os.path.basename(key).startswith((".", "__")):
                        continue
                    data = tf.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name}: {len(data)} of {m.size} bytes")
                    if key != cur_key:
                        if cur_key is not None:
                            yield Record(cur_key, cur, path)
                        cur_key, cur = key, {}
                    cur[ext] = data
                    tf.members.clear()          # TarFile keeps every header otherwise
                tf.fileobj.seek(tf.offset)
                end = tf.fileobj.read(512)
                if len(end) != 512 or any(end):
                    raise tarfile.ReadError(f"no end-of-archive block at byte {tf.offset} "
                                            f"(truncated or corrupt after {cur_key!r})")
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if on_error is None:
                raise UnreadableUnit(f"{path}: {type(e).__name__}: {e}") from e
            on_error(path, f"{type(e).__name__}: {e}")
            return
        if cur_key is not None:
            yield Record(cur_key, cur, path)


class ImageFolder:
    """Source over a folder tree: ``a/b/photo.jpg`` + ``a/b/photo.txt`` (+ ``photo.json``)
    is one sample with key ``a/b/photo``. A caption file without an image is kept as a
    record (and later skipped and counted as ``missing_image``); files are read lazily."""

    granularity = "item"

    def __init__(self, root: Union[str, os.PathLike], *, recursive: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {self.root} is not a directory")
        groups: Dict[str, Dict[str, Path]] = {}
        it = self.root.rglob("*") if recursive else self.root.iterdir()
        for p in it:
            if not p.is_file() or p.name.startswith("."):
                continue
            rel = p.relative_to(self.root).as_posix()
            key, ext = _split_key(rel)
            if key is None or ext not in IMAGE_EXTS + ("txt", "json"):
                continue
            groups.setdefault(key, {})[ext] = p
        self.items = sorted(groups.items())
        if not self.items:
            raise FileNotFoundError(f"root: no images or captions under {self.root}")

    def num_units(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        return f"image folder {self.root} ({len(self.items)} samples)"

    def records(self, unit: int, on_error=None) -> Iterator[Record]:
        key, files = self.items[unit]
        yield Record(key, dict(files), str(self.root))


def open_source(spec):
    """A source from a spec: an existing source object, a directory of tar shards, a directory
    of images, or a shard pattern / list."""
    if hasattr(spec, "records") and hasattr(spec, "num_units"):
        return spec
    if isinstance(spec, (str, os.PathLike)) and os.path.isdir(spec) and "::" not in os.fspath(spec):
        has_tar = any(p.name.endswith((".tar", ".tar.gz", ".tgz")) for p in Path(spec).iterdir())
        return TarShards(spec) if has_tar else ImageFolder(spec)
    return TarShards(spec)
