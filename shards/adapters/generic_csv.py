"""Any dataset as a CSV of `path,label[,split]`: the way in for data that has no adapter of its own.

Paths are URLs or paths relative to `videos`; image files become image records, so one list can mix
images and videos. An empty label means unlabelled (-1). Keys are the path (relative to `videos`, or the
URL without its protocol) minus the extension, with every other character than [A-Za-z0-9_-] made '_'.

The grammar leaves no row two readings (docs/datasets.md): a split column exists only under the header
`path,label,split`, so a label with an unquoted comma makes a row too long, an error that says to quote
it, instead of a label cut short and a new split. A first line that is neither that header nor a row
with a media path is a header under other names, also an error. Integer labels sort as numbers.

A URL row must be in the scheme of `videos` (s3:// rows with an s3:// videos root); local paths (absolute
or file://) are always taken. A row in another scheme (https://, a second store) is refused unless
`other_schemes=True`: an annotation file must not make the job request any URL the cluster can reach.
"""
from __future__ import annotations

import csv
import io
import re

from fsspec.core import url_to_fs

from shards.adapters.common import (IMAGE_EXTS, VIDEO_EXTS, AdapterResult, Collector, index_tree, open_url,
                                    read_classes, read_text, safe_key, split_name, to_url)
from shards.records import VideoRecord


HEADERS = (["path", "label"], ["path", "label", "split"])


def _columns(row: list[str], where: str) -> tuple[int, bool]:
    """(the file's number of columns, whether this first row is the header rather than data)."""
    names = [c.strip().lower() for c in row]
    if names in HEADERS:
        return len(names), True
    if split_name(row[0].strip())[2] not in VIDEO_EXTS + IMAGE_EXTS:
        raise ValueError(f"{where}: {','.join(row)!r} is neither the header path,label[,split] nor a row whose path "
                         "ends in a video or image extension; name the columns path,label or path,label,split (in "
                         "that order), or delete the line")
    return len(HEADERS[0]), False


def _parse(text: str, url: str, default_split: str) -> tuple[list[tuple], list[tuple]]:
    """(where, path, label, split) per row, and (where, split, reason) per malformed one; raises on ambiguity."""
    reader = csv.reader(io.StringIO(text))
    columns, entries, malformed = 0, [], []
    for row in reader:
        where = f"{url}:{reader.line_num}"
        if not "".join(row).strip():
            continue
        if not columns:
            columns, is_header = _columns(row, where)
            if is_header:
                continue
        if len(row) > columns:
            how = ("; or start the file with the header path,label,split to give each row a split"
                   if columns == 2 and len(row) == 3 else "")
            raise ValueError(f"{where}: {len(row)} fields {row} where the file has {columns} "
                             f"({','.join(HEADERS[columns - 2])}): quote a label that holds a comma, e.g. "
                             f'"car, phone"{how}')
        split = row[2] if len(row) > 2 else ""
        if split != "".join(split.split()):
            raise ValueError(f"{where}: split {split!r} has spaces in it; if the label before it holds a comma, "
                             f'quote the label (e.g. "car, phone"), else write the split without spaces')
        if len(row) < 2 or not row[0].strip():
            malformed.append((where, split or default_split, f"row {row} is not 'path,label[,split]'; fix the row"))
            continue
        entries.append((where, row[0].strip(), row[1].strip(), split or default_split))
    return entries, malformed


def class_order(labels: set[str]) -> list[str]:
    """Integer labels by value ("2" before "10"), any other set of labels sorted as text."""
    if labels and all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def load(annotations: str, videos: str | None = None, split: str = "train", classes=None,
         other_schemes: bool = False) -> AdapterResult:
    """`split`: the split of rows without one; `classes`: a list or a file of names in label order
    (default: `class_order` of every label); `other_schemes`: take rows in another scheme than `videos`."""
    out = Collector()
    fs, path = open_url(annotations, "annotations", must_be_dir=False)
    url = to_url(fs, path)
    entries, malformed = _parse(read_text(fs, path), url, split)
    for where, row_split, reason in malformed:
        out.fail(where, row_split, "annotations", reason)
    vfs, vroot = open_url(videos, "videos", must_be_dir=True) if videos else (None, None)
    found = {p for paths in index_tree(vfs, vroot, VIDEO_EXTS + IMAGE_EXTS).values() for p in paths} if vfs else set()
    names = read_classes(classes)
    if names is None:
        names = class_order({label for *_, label, _ in entries if label})
    index_of = {name: i for i, name in enumerate(names)}
    protocol = vfs.protocol if vfs else "file"
    schemes = {"file", *((protocol,) if isinstance(protocol, str) else protocol)}   # local paths are always fine
    for where, rel, label, row_split in entries:
        scheme = rel.split("://", 1)[0].lower() if "://" in rel else "file"
        if scheme not in schemes and not other_schemes:
            out.fail(where, row_split, "annotations", f"{rel} is a {scheme}:// URL but the videos are not; give "
                                                      f"--adapter-option other_schemes=true to fetch it")
            continue
        remote = "://" in rel or rel.startswith("/") or vroot is None
        efs, epath = url_to_fs(rel) if remote else (vfs, f"{vroot}/{rel.removeprefix('./')}")
        key = safe_key(rel.split("://")[-1].rsplit(".", 1)[0].removeprefix("./").lstrip("/"))
        if label and label not in index_of:
            out.fail(where, row_split, "annotations", f"label {label!r} is not in the given classes; fix it or add it", key)
            continue
        if not out.claim(where, row_split, key):
            continue
        if not (epath in found if not remote else efs.exists(epath)):
            out.fail(where, row_split, "fetch", f"no file {rel} (looked at {to_url(efs, epath)}); fix the path", key)
            continue
        media = "image" if split_name(epath)[2] in IMAGE_EXTS else "video"
        out.add(VideoRecord(key, row_split, index_of.get(label, -1), label, to_url(efs, epath), media=media))
    return out.finish(names)
