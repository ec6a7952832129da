"""The benchmarks' docs hold one section per device, so that a run on a lent GPU rewrites the GPU figures
and keeps the CPU ones (and back), and a run cut short by a time limit still leaves what it measured."""
from __future__ import annotations

from pathlib import Path


def splice(doc: str, title: str, device: str, block: str) -> str:
    """`doc` with the section of `device` replaced by `block` in place (added at the end if it has none);
    a doc that does not start with `title` is started afresh."""
    begin, end = f"<!-- BEGIN {device} run -->", f"<!-- END {device} run -->"
    section = f"{begin}\n{block.rstrip()}\n{end}"
    if not doc.startswith(title):
        doc = title
    if begin in doc and end in doc:
        return doc[:doc.index(begin)] + section + doc[doc.index(end) + len(end):]
    return doc.rstrip("\n") + f"\n\n{section}\n"


def write_section(path: str | Path, title: str, device: str, block: str) -> None:
    path = Path(path)
    path.write_text(splice(path.read_text() if path.exists() else "", title, device, block))
