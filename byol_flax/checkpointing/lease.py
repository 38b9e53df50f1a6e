"""A lease on a work directory: one run at a time writes to it, and a relaunch takes over.

Two runs on one workdir corrupt each other (the second start removes the first one's in-flight
save as a stale temporary directory). A run therefore holds ``<workdir>/lease.json`` (host, pid,
boot, start time, heartbeat, a random token) while it trains, refreshed by a heartbeat thread.

- **Start.** A free workdir is taken at once. A lease whose holder is provably gone (a dead
  process of this host and boot, or a host that rebooted) is taken over at once. Any other
  holder (another host, say a preempted VM) is watched for at most one stale window
  (``stale_after_seconds``): a heartbeat during it means the holder lives, and the start stops
  naming it; no heartbeat means the holder vanished, and the start takes over. The watch compares
  the record itself, not clocks, so hosts need not agree on the time.
- **Atomic.** Every change is a compare-and-swap against the record that was read: on gs:// an
  object generation precondition, locally an exclusive ``flock`` on the workdir. Of two starts
  racing for a stale lease exactly one wins.
- **Fencing.** A heartbeat that finds the record changed, or :func:`fence` (called before every
  checkpoint and every write to the workdir) finding another token, means the lease was taken
  over: the run stops at once with one line and exit status 1, writing nothing more (the new
  holder owns the workdir).

Heartbeats come every sixth of the stale window (10 s for the default 60 s): one small write,
cheap on gs://, and six chances per window for a live holder to show itself.
"""

import contextlib
import datetime
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from etils import epath

from byol_flax.errors import UserError
from byol_flax.runtime import console, logs
from byol_flax.storage import files, json_files, schemas

LEASE_NAME = "lease.json"
HEARTBEATS_PER_WINDOW = 6
LOST_EXIT_STATUS = 1  # like every other stop on a user-facing error (runtime.commands)
LEASE_MAX_BYTES = 64 * 1024  # a record is ~300 bytes


class WorkdirBusyError(UserError, OSError):
    """Another live run holds the work directory."""


class LeaseLostError(UserError, RuntimeError):
    """The lease was taken over by another run: this one must not write again."""


class _Changed(Exception):
    """The lease record changed since it was read (a compare-and-swap lost)."""


class _Store(Protocol):
    """Where the record lives: ``read`` gives (text or None, version); ``swap`` replaces the
    record (None deletes it) only if its version is still ``expected`` (None: absent), returning
    the new version, else raises :class:`_Changed`."""

    def read(self) -> tuple[str | None, Any]: ...

    def swap(self, expected: Any, text: str | None) -> Any: ...


class _LocalStore:
    """A local (or mounted) directory: the version is the record's text, swaps hold ``flock``
    on the directory so that a read-compare-write is one step for every process of the host
    (and of hosts sharing the file system, where it supports flock)."""

    def __init__(self, path: epath.Path):
        self.path = path

    def read(self) -> tuple[str | None, Any]:
        try:
            data = files.read_bytes(self.path, max_bytes=LEASE_MAX_BYTES, what="lease file")
        except FileNotFoundError:
            return None, None
        except files.StorageError as error:  # a FIFO, device or huge file: never a lease
            raise WorkdirBusyError(f"{error}; it is not a lease this project wrote: remove it "
                                   "to use the workdir") from None
        text = data.decode("utf-8", "replace")  # undecodable: a damaged record (_parse)
        return text, text

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        descriptor = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    def swap(self, expected: Any, text: str | None) -> Any:
        with self._locked():
            if self.read()[1] != expected:
                raise _Changed
            if text is None:
                self.path.unlink(missing_ok=True)
                return None
            files.write_text(self.path, text, what="lease file")
            return text


def gcs_client() -> Any:
    """A Cloud Storage client: the machine's credentials, or anonymous ones against an emulator
    (``STORAGE_EMULATOR_HOST``, which the client library honours)."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        return storage.Client(project="byol-flax-emulator", credentials=AnonymousCredentials())
    return storage.Client()


class _GcsStore:
    """A gs:// object: the version is its generation; swaps are generation preconditions (412
    when another writer came first), so acquisition and take-over are atomic."""

    def __init__(self, url: str):
        bucket, _, name = url.removeprefix("gs://").partition("/")
        self.url = url
        self.blob_name = name
        self.bucket = gcs_client().bucket(bucket)

    def read(self) -> tuple[str | None, Any]:
        from google.api_core import exceptions

        blob = self.bucket.get_blob(self.blob_name)
        if blob is None:
            return None, None
        if (blob.size or 0) > LEASE_MAX_BYTES:
            raise WorkdirBusyError(f"lease file {self.url} is {blob.size:,} bytes, not a lease "
                                   "this project wrote: remove it to use the workdir")
        try:
            text = blob.download_as_bytes(if_generation_match=blob.generation).decode(
                "utf-8", "replace")
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return self.read()  # changed between the two requests: read again
        return text, blob.generation

    def swap(self, expected: Any, text: str | None) -> Any:
        from google.api_core import exceptions

        blob = self.bucket.blob(self.blob_name)
        try:
            if text is None:
                blob.delete(if_generation_match=expected)
                return None
            blob.upload_from_string(text, content_type="application/json",
                                    if_generation_match=expected or 0)
        except (exceptions.PreconditionFailed, exceptions.NotFound) as error:
            raise _Changed from error
        return blob.generation


def _store(path: epath.Path) -> _Store:
    text = os.fspath(path)
    return _GcsStore(text) if text.startswith("gs://") else _LocalStore(path)


def _boot_id() -> str | None:
    try:
        return _read_text("/proc/sys/kernel/random/boot_id")
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``): a holder in another one (a
    container on the same host) has a pid this process cannot look up."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a live holder
    from a later process that reuses its pid."""
    try:
        stat = _read_text(f"/proc/{pid}/stat")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _read_text(path: str) -> str:
    return files.read_text(path, max_bytes=4096, what="kernel file").strip()


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


def _parse(text: str | None) -> dict[str, Any] | None:
    """The lease record of ``text``; ``{}`` for a damaged one (not a lease record)."""
    if text is None:
        return None
    try:
        return json_files.loads(text, name="lease", spec=schemas.LEASE, max_depth=4)
    except files.StorageError:
        return {}


def _holder(record: dict[str, Any]) -> str:
    return f"process {record.get('pid')} on host {record.get('host')}"


class WorkdirLease:
    """``with WorkdirLease(workdir, stale_after_seconds=60):`` holds the workdir for a run."""

    def __init__(self, workdir: epath.PathLike, *, stale_after_seconds: float,
                 heartbeat_seconds: float | None = None):
        self.path = epath.Path(workdir) / LEASE_NAME
        self.stale_after = stale_after_seconds
        self.heartbeat = heartbeat_seconds or max(stale_after_seconds / HEARTBEATS_PER_WINDOW,
                                                  0.05)
        self.token = secrets.token_hex(8)
        self._store = _store(self.path)
        self._version: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self._unguard: Callable[[], None] = lambda: None

    def _record(self) -> str:
        return json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(), "process_start": _process_start(os.getpid()),
            "token": self.token,
            "started": _iso(self._started), "heartbeat": time.time()}, indent=2)

    def gone_reason(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder`` is certainly gone without waiting (unreadable, a heartbeat older than
        the stale window, a dead process or a rebooted host), or None."""
        if not holder:
            return "its lease file is damaged (not a lease record this project writes)"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after:  # a relaunch long after the holder vanished: no wait
            return f"its last heartbeat is {age:.0f} s old (stale after {self.stale_after:.0f} s)"
        if holder.get("host") != socket.gethostname():
            return None
        boot = _boot_id()
        if boot and holder.get("boot_id") and holder["boot_id"] != boot:
            return "this host has rebooted since"
        if not self._same_pid_namespace(holder):
            return None  # its pid means nothing here: only its heartbeat can tell
        pid = int(holder.get("pid", -1))
        start = _process_start(pid)
        if start is None:
            return f"process {pid} on this host is not running"
        if holder.get("process_start") and holder["process_start"] != start:
            return f"process {pid} on this host is another process now (its pid was reused)"
        return None

    def _same_host(self, holder: dict[str, Any]) -> bool:
        """Whether ``holder``'s process can be looked up here: this host, this boot and this
        PID namespace (a container on the same host, e.g. Docker with host networking on a
        TPU VM, shares the host name but not the pids)."""
        return holder.get("host") == socket.gethostname() and self._same_pid_namespace(holder)

    @staticmethod
    def _same_pid_namespace(holder: dict[str, Any]) -> bool:
        ours, theirs = _pid_namespace(), holder.get("pid_namespace")
        return ours is None or theirs is None or ours == theirs

    def _wait_for_silence(self, text: str, version: Any) -> tuple[str, Any]:
        """Watches a live-looking holder for one stale window. Returns why it may be taken over
        and the version to replace, or raises :class:`WorkdirBusyError` as soon as it beats (or
        a third run takes it)."""
        holder = _parse(text) or {}
        name = _holder(holder)
        console.stage("%s holds %s: waiting up to %.0f s for its heartbeat to stop", name,
                      self.path.parent, self.stale_after)
        deadline = time.monotonic() + self.stale_after
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat / 2, max(deadline - time.monotonic(), 0)))
            now_text, now_version = self._store.read()
            if now_version != version:
                now = _parse(now_text)
                if now is None:
                    return "it released the lease", None
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by {_holder(now)} (started "
                    f"{now.get('started')}; its heartbeat is live): stop that run or use "
                    f"another --workdir")
        return f"it has not refreshed its lease for {self.stale_after:.0f} s", version

    def acquire(self) -> "WorkdirLease":
        """Takes the lease (waiting at most one stale window for a silent holder) or raises
        :class:`WorkdirBusyError` naming the live holder."""
        text, version = self._store.read()
        if text is not None:
            holder = _parse(text) or {}
            reason = self.gone_reason(holder)
            if reason is None and self._same_host(holder):  # its process runs: certainly live
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by {_holder(holder)} (started "
                    f"{holder.get('started')}): stop that run or use another --workdir")
            if reason is None:  # another host: only its heartbeat can tell
                reason, version = self._wait_for_silence(text, version)
            console.stage("taking over the lease of %s from %s: %s", self.path.parent,
                          _holder(holder), reason)
        try:
            self._version = self._store.swap(version, self._record())
        except _Changed:
            now = _parse(self._store.read()[0]) or {}
            raise WorkdirBusyError(f"{self.path.parent} was just taken by {_holder(now)}") \
                from None
        _ACTIVE.lease = self
        self._unguard = logs.guard_log_file(_fence_log)  # the log file is in the workdir
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lease")
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._version = self._store.swap(self._version, self._record())
            except _Changed:
                if not self._stop.is_set():
                    self.stop_lost()
                return
            except Exception as error:  # noqa: BLE001  (transient storage errors, the client
                # library's own types included: retried at the next beat; a lost lease shows
                # as a changed record then)
                logging.warning("cannot refresh the lease %s: %s", self.path, error)

    def held(self) -> bool:
        """Whether the record still carries this run's token (one read of the lease)."""
        return (_parse(self._store.read()[0]) or {}).get("token") == self.token

    def stop_lost(self) -> None:
        """The lease is another run's now: one line on the console, exit at once, no more
        writes (no flushing of logs, writers or checkpoints into the new holder's workdir)."""
        with _ACTIVE.stopping:
            try:
                record = _parse(self._store.read()[0])
            except Exception:  # noqa: BLE001  (the line must come out whatever storage says)
                record = {}
            holder = (f"by {_holder(record)}" if record and record.get("host")
                      else "by another run, which has finished since" if record is None
                      else "by another run")
            error = LeaseLostError(
                f"the lease of {self.path.parent} was taken over {holder} while this run was "
                f"silent for longer than {self.stale_after:.0f} s; this run stops without "
                "writing anything more (the new holder continues from the newest checkpoint)")
            console.interrupt(f"error: LeaseLostError: {error}")
            os._exit(LOST_EXIT_STATUS)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still ours."""
        self._stop.set()
        self._unguard()
        if _ACTIVE.lease is self:
            _ACTIVE.lease = None
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
            try:
                self._store.swap(self._version, None)
            except _Changed:
                pass  # another run holds it now: not ours to remove
            except Exception as error:  # noqa: BLE001  (goes stale by itself: no heartbeat)
                logging.warning("cannot remove the lease %s: %s", self.path, error)

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


class _Active:
    """The lease this process holds (a process trains into one workdir at a time)."""
    lease: WorkdirLease | None = None
    stopping = threading.Lock()


_ACTIVE = _Active()


def fence() -> None:
    """Called before a checkpoint or any write to the workdir: when this process holds a lease
    that another run has taken over, stops at once (:meth:`WorkdirLease.stop_lost`). A no-op in
    processes that hold none (other hosts of a multi-host run, tools, tests)."""
    held = _ACTIVE.lease
    if held is not None and not held.held():
        held.stop_lost()


def _fence_log() -> None:
    """:func:`fence` before a log line; a lease that cannot be read now is checked at the next
    write (a logging call must not fail)."""
    try:
        fence()
    except OSError:
        pass
