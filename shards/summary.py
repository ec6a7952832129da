"""A person-readable account of a finished shard output, read back from what is on storage.

Reading the files (not the job's memory) means the summary is also a check that the outputs can be
read; the demo prints it with `python -m shards.summary OUTPUT`.
"""
from __future__ import annotations

import sys
from collections import Counter

import pyarrow.parquet as pq

from . import storage


def describe(output: str, examples: int = 10) -> str:
    fs, root = storage.resolve(output)
    manifest = storage.read_json(fs, storage.join(root, "manifest.json"))
    with fs.open(storage.join(root, "failures.parquet"), "rb") as f:
        # single-threaded: pyarrow 26 sometimes aborts at interpreter exit after a threaded read of a Python file
        failures = pq.read_table(f, use_threads=False).to_pylist()
    lines = [f"shards in {output} ({manifest['dataset']}, {manifest['classes']} classes)"]
    for split, c in manifest["splits"].items():
        lines.append(f"  {split:<6} {c['indexed']:>7} videos indexed, {c['failed']:>5} failed, "
                     f"{c['shards']:>4} shards, {c['bytes'] / 1e6:,.1f} MB")
    if failures:
        by_stage = Counter(f["stage"] for f in failures)
        lines.append(f"  failures: {len(failures)} ({', '.join(f'{s}: {n}' for s, n in sorted(by_stage.items()))})")
        for f in failures[:examples]:
            lines.append(f"    [{f['split']}/{f['stage']}] {f['key'] or f['source']}: {f['reason']}")
        if len(failures) > examples:
            lines.append(f"    ... {len(failures) - examples} more in failures.parquet")
    else:
        lines.append("  failures: none")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m shards.summary OUTPUT")
    print(describe(sys.argv[1]))
