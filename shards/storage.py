"""Where the shard job's bytes go: one small layer over fsspec, so local disk, s3:// and gs:// behave alike.

The job's crash safety rests on one property: a file under its final name is either complete or
absent. Local disk gets that from writing a hidden temporary file beside the target and renaming it
(same folder, so the rename is atomic); object stores get it from fsspec's non-autocommit files, whose
upload is only published on `commit()` (S3: the multipart upload completes, GCS: the resumable upload
finalises), and is aborted by `discard()`.

Endpoints and credentials come the way users already configure them: standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...), fsspec's `FSSPEC_<PROTOCOL>_<OPTION>` variables, or the
cloud's credential chain (instance profiles, workload identity). Every process reads them where it runs:
the driver hands Ray workers nothing, because Ray logs a task's runtime environment in full. A local Ray
the driver starts inherits the driver's environment; a cluster's nodes get theirs when `ray start` runs
(a Kubernetes Secret, an instance profile; docs/infra.md).
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it); a local path is made absolute, since Ray workers run in other folders."""
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    return fsspec.core.url_to_fs(url)


def absolute_url(url: str) -> str:
    """The URL with a local path made absolute; remote URLs pass unchanged."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[IO]:
    """Yield a file that appears at `path` only if the block finishes without an exception."""
    if is_local(fs):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        temp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(temp, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
        return
    f = fs.open(path, mode, autocommit=False)
    try:
        yield f
    except BaseException:
        f.discard()
        raise
    f.close()
    f.commit()


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete temporaries a killed writer left for `path` (local only; object stores publish nothing on a crash)."""
    folder, name = os.path.split(path)
    if not is_local(fs) or not os.path.isdir(folder):
        return
    prefix = f".{name}.tmp-"
    for entry in os.listdir(folder):
        if entry.startswith(prefix):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, entry))


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj) -> None:
    with atomic_write(fs, path, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def check_writable(url: str) -> None:
    """Write and delete a probe object, so a read-only or unreachable output fails before any work is done."""
    fs, path = resolve(url)
    probe = join(path, f".probe-{uuid.uuid4().hex[:8]}")
    with atomic_write(fs, probe) as f:
        f.write(b"probe")
    fs.rm(probe)
