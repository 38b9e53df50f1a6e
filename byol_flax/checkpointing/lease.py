"""A lease on a work directory: one run at a time writes its checkpoints.

Two runs on one workdir corrupt each other (the second start removes the first one's in-flight
save as a stale temporary directory). A run therefore holds ``<workdir>/lease.json`` (host, pid,
start time, heartbeat, a random token) while it trains, refreshed by a heartbeat thread. A
second run on a live workdir stops at once naming the holder; a stale lease (its process is dead
on this host, or its heartbeat is older than ``stale_after_seconds``) is taken over with a
warning. Works on local paths and gs:// (a write followed by a read-back of the token).
"""

import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from typing import Any

from etils import epath

from byol_flax.errors import UserError

LEASE_NAME = "lease.json"


class WorkdirBusyError(UserError, OSError):
    """Another live run holds the work directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


class WorkdirLease:
    """``with WorkdirLease(workdir, stale_after_seconds=600):`` holds the workdir for a run."""

    def __init__(self, workdir: epath.PathLike, *, stale_after_seconds: float,
                 heartbeat_seconds: float | None = None):
        self.path = epath.Path(workdir) / LEASE_NAME
        self.stale_after = stale_after_seconds
        self.heartbeat = heartbeat_seconds or max(stale_after_seconds / 10, 0.05)
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()

    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": _iso(self._started), "heartbeat": time.time()}

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as error:  # a half-written lease of a killed run
            logging.warning("unreadable lease %s (%s): treated as stale", self.path, error)
            return {}

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder``'s lease may be taken over, or None while it is live."""
        if not holder:
            return "it is unreadable"
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"])):
            return f"process {holder['pid']} on this host is not running"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_after:
            return f"its last heartbeat is {age:.0f} s old (stale after {self.stale_after:.0f} s)"
        return None

    def acquire(self) -> "WorkdirLease":
        """Takes the lease or raises :class:`WorkdirBusyError` naming the live holder."""
        holder = self._read()
        if holder is not None:
            reason = self.stale_reason(holder)
            if reason is None:
                raise WorkdirBusyError(
                    f"{self.path.parent} is in use by process {holder['pid']} on host "
                    f"{holder['host']} (started {holder.get('started')}, heartbeat "
                    f"{time.time() - float(holder['heartbeat']):.0f} s ago): stop that run or use "
                    f"another --workdir")
            logging.warning("taking over the lease of %s from process %s on host %s: %s",
                            self.path.parent, holder.get("pid"), holder.get("host"), reason)
        self._write(exclusive=holder is None)
        if (self._read() or {}).get("token") != self.token:  # another start won the race
            holder = self._read() or {}
            raise WorkdirBusyError(f"{self.path.parent} was just taken by process "
                                   f"{holder.get('pid')} on host {holder.get('host')}")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lease")
        self._thread.start()
        return self

    def _write(self, *, exclusive: bool = False) -> None:
        text = json.dumps(self._record(), indent=2)
        if exclusive and "://" not in os.fspath(self.path):
            try:  # two starts at the same moment: only one creates the file
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return  # the read-back in acquire names the winner
            with os.fdopen(descriptor, "w") as file:
                file.write(text)
            return
        temporary = self.path.with_name(f"{LEASE_NAME}.{self.token}.tmp")
        temporary.write_text(text)
        temporary.replace(self.path)  # overwrites: a stale lease or our own heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                if (self._read() or {}).get("token") != self.token:
                    logging.error("the lease of %s was taken by another run", self.path.parent)
                    return
                self._write()
            except OSError as error:  # a transient storage error: retried at the next beat
                logging.warning("cannot refresh the lease %s: %s", self.path, error)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
            if (self._read() or {}).get("token") == self.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
