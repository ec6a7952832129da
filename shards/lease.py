"""One writer per shard output: a lease object that a job holds while it runs, on a local disk or in a bucket.

A lock file outlives a killed job; a lease does not. `_job/lease.json` names its owner (host, pid, a
random job id, start time) and an expiry that the owner keeps pushing forward from a daemon thread (the
heartbeat). A second job that finds a live lease refuses and names the owner; one that finds an expired
lease, or one whose process is gone from this very host, takes it over and says so. Every change to the
lease is conditional on the version its writer last saw, so two jobs racing for it cannot both win:

- S3: `PUT If-None-Match: *` creates it and `PUT If-Match: <ETag>` renews or takes it over (AWS since
  2024, MinIO, moto); `DELETE If-Match: <ETag>` releases it (AWS since 2025).
- a local disk (also NFS): the same read-compare-write while holding an exclusive `flock` on
  `_job/lease.lock` (re-checked after locking, as the releasing job deletes the lock file).
- other stores (GCS, Azure, ...): write, wait, read back and compare; this narrows the race between two
  jobs started within a second of each other but does not close it, and the job says so when it starts.

Expiry compares wall clocks of different hosts, so clocks must agree to well within `ttl` (NTP does).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from . import storage

LEASE = "_job/lease.json"
TTL_S = 60.0            # a lease not renewed for this long belongs to a dead job
HEARTBEAT_S = 10.0      # how often the holder renews it; several renewals may fail before it expires
_SETTLE_S = 1.0         # fallback stores: how long a writer waits before reading its write back


class LeaseHeld(RuntimeError):
    """Another live job holds the output."""


class LeaseLost(RuntimeError):
    """This job's lease expired or was taken over while it ran: it must stop writing."""


def _pid_namespace() -> str:
    """Two containers on one host name can reuse each other's pids; a pid is only comparable within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_gone(owner: dict) -> bool:
    """True only when the owner ran on this host, in this pid namespace, and its pid no longer exists."""
    if owner.get("host") != socket.gethostname() or not owner.get("pid_namespace") \
            or owner.get("pid_namespace") != _pid_namespace():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):   # alive under another user (EPERM), or an odd record: assume it lives
        return False
    return False


def describe_owner(record: dict) -> str:
    owner = record.get("owner", {})
    beat = time.time() - float(record.get("heartbeat", 0))
    return (f"host {owner.get('host')}, pid {owner.get('pid')}, job id {owner.get('id')}, started "
            f"{owner.get('started')}, last heartbeat {beat:.0f} s ago")


# ---------------------------------------------------------------- conditional writes per store
# Each store reads the lease as (bytes, version) and changes it only if the version is still the one given.

class _LocalStore:
    def __init__(self, fs, path: str):
        self.fs, self.path, self.lock = fs, path, os.path.join(os.path.dirname(path), "lease.lock")
        self.conditional = True

    @contextlib.contextmanager
    def _locked(self):
        """An exclusive flock on `lease.lock`; retried when the file was unlinked while we waited for it."""
        import fcntl

        while True:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)   # closing the descriptor releases the flock

    def _current(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, bytes] | None:
        data = self._current()   # no lock needed: the file is only ever replaced whole, by a rename
        return None if data is None else (data, data)

    def _write(self, data: bytes) -> bytes:
        with storage.atomic_write(self.fs, self.path) as f:
            f.write(data)
        return data

    def create(self, data: bytes) -> bytes | None:
        with self._locked():
            return self._write(data) if self._current() is None else None

    def replace(self, data: bytes, version: bytes) -> bytes | None:
        with self._locked():
            return self._write(data) if self._current() == version else None

    def delete(self, version: bytes) -> None:
        """Also removes the lock file (safe while holding it, see `_locked`) and `_job/` if nothing else is
        in it, so a job that stopped before its first write leaves nothing behind."""
        with self._locked():
            if self._current() != version:
                return
            os.remove(self.path)
            os.remove(self.lock)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.path))


def _condition_failed(e: OSError) -> bool:
    """s3fs maps a failed precondition to FileExistsError or a bare EINVAL; the botocore cause says which."""
    response = getattr(e.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return isinstance(e, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict")


class _S3Store:
    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)
        self.conditional = True

    def read(self) -> tuple[bytes, str] | None:
        # The version first, then the bytes: the bytes are then never older than the version a change is
        # conditioned on, so a stale read can only make a job refuse, never overwrite a newer lease.
        try:
            version = self.fs.call_s3("head_object", Bucket=self.bucket, Key=self.key)["ETag"]
            return self.fs.cat_file(self.path), version
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except OSError as e:
            if _condition_failed(e):
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except FileNotFoundError:
            pass
        except OSError as e:
            if _condition_failed(e):
                return
            if e.errno != errno.ENOSYS:   # a server without conditional deletes: compare, then delete
                raise
            current = self.read()
            if current is not None and current[1] == version:
                self.fs.rm_file(self.path)


class _ReadBackStore:
    """Stores without conditional writes: write, wait, and keep the lease only if the write is still there."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.conditional = False

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _write_and_confirm(self, data: bytes) -> bytes | None:
        with storage.atomic_write(self.fs, self.path) as f:
            f.write(data)
        time.sleep(_SETTLE_S)
        current = self.read()
        return data if current is not None and current[0] == data else None

    def create(self, data: bytes) -> bytes | None:
        return None if self.read() is not None else self._write_and_confirm(data)

    def replace(self, data: bytes, version: bytes) -> bytes | None:
        current = self.read()
        return self._write_and_confirm(data) if current is not None and current[1] == version else None

    def delete(self, version: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.fs.rm_file(self.path)


def _store(output: str):
    fs, root = storage.resolve(output)
    path = storage.join(root, LEASE)
    if storage.is_local(fs):
        return _LocalStore(fs, path)
    if "s3" in fs.protocol:
        return _S3Store(fs, path)
    return _ReadBackStore(fs, path)


# ---------------------------------------------------------------- the lease

class Lease:
    """`with Lease(output):` holds the output for the block: acquired (or refused) on entry, renewed by a
    daemon thread, released on any exit, Ctrl-C included. `check()` raises `LeaseLost` once it is gone."""

    def __init__(self, output: str, log: Callable[[str], None] = print, ttl: float = TTL_S,
                 heartbeat: float = HEARTBEAT_S):
        self.output, self.log, self.ttl, self.heartbeat = output, log, ttl, heartbeat
        self.store = _store(output)
        self.owner = {"id": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
                      "pid_namespace": _pid_namespace(),
                      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.version = None      # the store's version of our last write; None while not held
        self.expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> tuple[bytes, float]:
        now = time.time()
        record = {"owner": self.owner, "heartbeat": now, "expires": now + self.ttl, "ttl": self.ttl}
        return json.dumps(record, sort_keys=True).encode(), now + self.ttl

    @staticmethod
    def _stale_because(record: dict) -> str | None:
        if _process_gone(record.get("owner", {})):
            return f"its process {record['owner'].get('pid')} is no longer running on this host"
        overdue = time.time() - float(record.get("expires", 0))
        return f"it expired {overdue:.0f} s ago" if overdue > 0 else None

    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeld` naming the job that holds it."""
        if not self.store.conditional:
            self.log(f"lease: {self.output} cannot be written conditionally; two jobs started on it within "
                     f"{_SETTLE_S:g} s of each other could both write")
        for _ in range(5):   # each retry follows a change by another job between our read and our write
            data, expires = self._record()
            current = self.store.read()
            if current is None:
                version, taken_from = self.store.create(data), None
            else:
                record = json.loads(current[0])
                why = self._stale_because(record)
                if why is None:
                    raise LeaseHeld(f"--output {self.output} is being written by another shard job "
                                    f"({describe_owner(record)}); wait for it to finish or stop it, then rerun "
                                    f"this command (a job that died is taken over {record.get('ttl', self.ttl):.0f} s "
                                    "after its last heartbeat, at once if it ran on this host)")
                version = self.store.replace(data, current[1])
                taken_from = (f"took over the lease of --output {self.output} from a job that did not release "
                              f"it ({describe_owner(record)}): {why}")
            if version is not None:
                self.version, self.expires = version, expires
                if taken_from:
                    self.log(taken_from)
                return
        raise LeaseHeld(f"--output {self.output}: other jobs keep changing its lease ({LEASE}); "
                        "run one job per output")

    def renew(self) -> None:
        """Push the expiry forward; a lease that someone else changed is lost for good."""
        if self._lost or self.version is None:
            return
        data, expires = self._record()
        version = self.store.replace(data, self.version)
        if version is None:
            self._lost = "another job took it over"
        else:
            self.version, self.expires = version, expires

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat) and not self._lost:
            try:
                self.renew()
            except Exception:   # noqa: BLE001 - storage trouble: retried next beat; check() notices the expiry
                continue

    def check(self) -> None:
        """Raise `LeaseLost` when this job may no longer write the output."""
        why = self._lost or ("it could not be renewed before it expired" if time.time() > self.expires else None)
        if why:
            raise LeaseLost(f"this job lost its lease on --output {self.output} ({why}) and stopped; committed "
                            "shards are kept: rerun the same command once no other job writes there")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.version is not None and not self._lost:
            self.store.delete(self.version)
        self.version = None

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="shard-job-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.release()
        except Exception as e:   # noqa: BLE001 - must not hide why the job ended
            self.log(f"could not release the lease {LEASE} ({type(e).__name__}: {e}); the next job on "
                     f"--output {self.output} takes it over {self.ttl:.0f} s after its last heartbeat")
