"""UCF101: classInd.txt, trainlist0N.txt / testlist0N.txt (N = the official split 1-3), videos <Class>/<name>.avi.

Class indices follow classInd.txt. Test lists carry no label, so the class comes from the folder in
the listed path, compared without case: the official lists write "HandstandPushups" for files named
v_HandStandPushups_*.
"""
from __future__ import annotations

from shards.adapters.common import AdapterResult, Collector, index_tree, open_url, pick, read_text, safe_key, to_url
from shards.records import VideoRecord


def load(annotations: str, videos: str, split: int = 1) -> AdapterResult:
    out = Collector()
    fs, root = open_url(annotations, "annotations", must_be_dir=True)
    files = {p.rsplit("/", 1)[-1].lower(): p for p in fs.find(root)}
    needed = ["classind.txt", f"trainlist0{split}.txt", f"testlist0{split}.txt"]
    if missing := [n for n in needed if n not in files]:
        raise FileNotFoundError(f"{missing} not under {annotations!r}; pass the ucfTrainTestlist folder (split={split})")
    numbered = sorted((int(n), name) for n, name in (line.split() for line in
                                                      read_text(fs, files["classind.txt"]).splitlines() if line.strip()))
    classes = [name for _, name in numbered]
    by_lower = {c.lower(): i for i, c in enumerate(classes)}
    vfs, vroot = open_url(videos, "videos", must_be_dir=True)
    found = {k.lower(): v for k, v in index_tree(vfs, vroot).items()}
    for split_name, list_file in (("train", needed[1]), ("test", needed[2])):
        url = to_url(fs, files[list_file])
        for n, line in enumerate(read_text(fs, files[list_file]).splitlines(), 1):
            if not line.strip():
                continue
            where, parts = f"{url}:{n}", line.split()
            folder, _, name = parts[0].rpartition("/")
            stem = name.rsplit(".", 1)[0]
            label = by_lower.get(folder.lower(), -1)
            if len(parts) > 1 and parts[1].isdigit():
                label = int(parts[1]) - 1
            if not 0 <= label < len(classes):
                out.fail(where, split_name, "annotations", f"{line.strip()!r} names no class of classInd.txt; fix the line")
                continue
            key = safe_key(stem)
            if not out.claim(where, split_name, key):
                continue
            if stem.lower() not in found:
                out.fail(where, split_name, "fetch", f"no video {name} under {videos}; download UCF101 again", key)
                continue
            source = pick(found[stem.lower()], classes[label])
            out.add(VideoRecord(key, split_name, label, classes[label], to_url(vfs, source)))
    return out.finish(classes)
