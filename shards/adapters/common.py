"""What every adapter needs: listing a tree once, naming files as URLs, and collecting records and failures.

Listing the whole video tree with one `fs.find` matters on object storage: a Kinetics split is
hundreds of thousands of files, and a stat per row would be as many requests.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from fsspec.core import url_to_fs

from shards.records import Failure, VideoRecord

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "flv", "3gp", "mpg", "mpeg", "ogv", "wmv")
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff")


@dataclass
class AdapterResult:
    records: list[VideoRecord] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def open_url(url: str, what: str, must_be_dir: bool | None = None):
    """(fs, path) for a URL, with an error that says which argument is wrong when it is not there."""
    fs, path = url_to_fs(str(url))
    path = path.rstrip("/") or path
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {url!r} does not exist; pass the folder (or file) you downloaded")
    if must_be_dir is not None and fs.isdir(path) != must_be_dir:
        raise NotADirectoryError(f"{what} {url!r} must be a {'folder' if must_be_dir else 'file'}")
    return fs, path


def to_url(fs, path: str) -> str:
    """Local files stay plain paths (readable in reports); remote ones get their protocol back."""
    return path if "file" in fs.protocol else fs.unstrip_protocol(path)


def split_name(path: str) -> tuple[str, str, str]:
    """(parent folder, stem, extension) of a path; the stem keeps inner dots."""
    parent, _, name = path.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    return parent.rpartition("/")[2], (stem if dot else name), (ext.lower() if dot else "")


def index_tree(fs, root: str, exts=VIDEO_EXTS) -> dict[str, list[str]]:
    """stem -> paths of every file with one of `exts` anywhere under root, from one listing."""
    index: dict[str, list[str]] = defaultdict(list)
    for path in sorted(fs.find(root)):
        _, stem, ext = split_name(path)
        if ext in exts:
            index[stem].append(path)
    return index


def pick(candidates: list[str], *folders: str) -> str:
    """Prefer the copy whose folder is the split or the class (a tree may hold the same id twice)."""
    wanted = {f.lower() for f in folders if f} | {f.lower().replace(" ", "_") for f in folders if f}
    return next((p for p in candidates if split_name(p)[0].lower() in wanted), candidates[0])


def safe_key(text: str) -> str:
    """WebDataset splits a sample's file name at the first dot, so keys keep only [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def read_text(fs, path: str) -> str:
    with fs.open(path, "rb") as f:
        return f.read().decode("utf-8-sig", errors="replace")


def read_classes(option, what: str = "classes") -> list[str] | None:
    """`classes=` may be a list of names or the URL of a text file with one name per line."""
    if option is None or isinstance(option, (list, tuple)):
        return None if option is None else list(option)
    fs, path = open_url(option, what, must_be_dir=False)
    return [line.strip() for line in read_text(fs, path).splitlines() if line.strip()]


class Collector:
    """Builds the result; one key per split, and every rejected row becomes a Failure that says why."""

    def __init__(self):
        self.result = AdapterResult()
        self._claimed: dict[tuple[str, str], str] = {}

    def fail(self, where: str, split: str, stage: str, reason: str, key: str = "") -> None:
        self.result.failures.append(Failure(where, split, stage, f"{where}: {reason}", key))

    def claim(self, where: str, split: str, key: str) -> bool:
        """False (and a failure) when the key was already used in this split."""
        first = self._claimed.setdefault((split, key), where)
        if first != where:
            self.fail(where, split, "annotations", f"duplicate: key {key!r} is already used by {first} in split "
                                                   f"{split!r}; delete one of the two rows", key)
            return False
        return True

    def add(self, record: VideoRecord) -> None:
        self.result.records.append(record)

    def finish(self, classes: list[str]) -> AdapterResult:
        self.result.classes = list(classes)
        return self.result
