"""Whether a benchmark ran on a quiet machine: what else used the CPUs while it measured.

A figure that compares two implementations is only worth reporting when nothing else ran beside
them: on 2 cores another job oversubscribes PyTorch's thread pool more than XLA's, and a ratio
measured that way (2.24x) was 0.53x on a quiet machine. :func:`watch` measures, over a window,

- the CPU time of every other process: the machine's busy time (``/proc/stat``: user, nice,
  system, irq, softirq) less this process's and its waited-for children's (``getrusage``), as
  a share of the window's CPU capacity (wall seconds x CPUs);
- the steal time (a hypervisor giving the VM's CPUs to others), as a share of the same;
- the load average before and after.

A window is *quiet* when others took at most :data:`MAX_OTHER_SHARE` and steal at most
:data:`MAX_STEAL_SHARE`; a benchmark whose rounds were not all quiet prints no ratio, only the
reason. Linux only (``/proc``); elsewhere the load is unknown and no ratio is printed either.
"""

import contextlib
import dataclasses
import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

MAX_OTHER_SHARE = 0.05  # others may use 5% of the CPUs' time (kernel threads, the shell, ...)
MAX_STEAL_SHARE = 0.02
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclasses.dataclass(frozen=True)
class Sample:
    """The machine's CPU counters at one moment."""

    moment: float  # monotonic seconds
    busy_seconds: float | None  # every CPU's non-idle time, all processes and the kernel
    steal_seconds: float | None
    own_seconds: float  # this process and its waited-for children (user + system)
    load_average: float | None  # 1-minute


def _proc_stat() -> tuple[float, float] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def sample() -> Sample:
    stat = _proc_stat()
    own = sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))
    try:
        load = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        load = None
    return Sample(time.monotonic(), stat[0] if stat else None, stat[1] if stat else None, own,
                  load)


@dataclasses.dataclass(frozen=True)
class Load:
    """What else used the CPUs between two samples."""

    seconds: float
    cpus: int
    other_share: float | None  # others' CPU time / (seconds x cpus)
    steal_share: float | None
    load_before: float | None
    load_after: float | None

    @classmethod
    def between(cls, start: Sample, end: Sample, cpus: int | None = None) -> "Load":
        cpus = cpus or os.cpu_count() or 1
        seconds = max(end.moment - start.moment, 1e-9)
        other = steal = None
        if start.busy_seconds is not None and end.busy_seconds is not None:
            others = (end.busy_seconds - start.busy_seconds) - (end.own_seconds
                                                                 - start.own_seconds)
            other = max(0.0, others) / (seconds * cpus)
            steal = (end.steal_seconds - start.steal_seconds) / (seconds * cpus)
        return cls(seconds, cpus, other, steal, start.load_average, end.load_average)

    @property
    def quiet(self) -> bool:
        return self.reason() is None

    def reason(self) -> str | None:
        """Why this window does not count (None: it does)."""
        if self.other_share is None:
            return "the CPU load cannot be read here (no /proc/stat)"
        if self.other_share > MAX_OTHER_SHARE:
            return (f"other processes used {self.other_share:.0%} of the {self.cpus} CPUs' "
                    f"time (at most {MAX_OTHER_SHARE:.0%} counts as quiet; load average "
                    f"{self.load_before} -> {self.load_after})")
        if self.steal_share is not None and self.steal_share > MAX_STEAL_SHARE:
            return (f"the hypervisor took {self.steal_share:.0%} of the CPUs' time (steal; at "
                    f"most {MAX_STEAL_SHARE:.0%} counts as quiet)")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 1), "cpus": self.cpus,
                "other_share": None if self.other_share is None else round(self.other_share, 4),
                "steal_share": None if self.steal_share is None else round(self.steal_share, 4),
                "load_before": self.load_before, "load_after": self.load_after,
                "quiet": self.quiet}


@contextlib.contextmanager
def watch(into: list["Load"]) -> Iterator[None]:
    """Appends the :class:`Load` of the ``with`` block to ``into``. Children the block starts
    count as this process's own only once waited for (``subprocess.run`` does)."""
    start = sample()
    try:
        yield
    finally:
        into.append(Load.between(start, sample()))


def verdict(loads: Sequence[Load]) -> dict[str, Any]:
    """The rounds' loads for a result's JSON: each round's, the worst share, and whether the
    figure counts (every round quiet), with the first reason when it does not."""
    reasons = [reason for load in loads if (reason := load.reason())]
    shares = [load.other_share for load in loads if load.other_share is not None]
    return {"rounds": [load.as_dict() for load in loads],
            "max_other_share": round(max(shares), 4) if shares else None,
            "quiet": bool(loads) and not reasons,
            "reason": (f"{len(reasons)} of {len(loads)} rounds were not quiet: {reasons[0]}"
                       if reasons else None)}


def host_description() -> str:
    """The CPU model and count, as the docs' tables name the machine a figure came from."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def provenance() -> dict[str, Any]:
    """Where and when a result was measured, for its JSON (``benchmarks/report.py`` prints it
    beside the table): date, host, the JAX version and the XLA flags in effect."""
    import jax

    return {"date": time.strftime("%Y-%m-%d"), "host": host_description(),
            "versions": f"jax {jax.__version__}", "xla_flags": os.environ.get("XLA_FLAGS", "")}


def emit(result: dict[str, Any], json_out: str | None) -> None:
    """Prints a benchmark's result as its final JSON line and, with ``--json-out``, writes it
    where ``benchmarks/report.py`` reads it."""
    import json

    from byol_flax.storage import files

    print(json.dumps(result))
    if json_out:
        files.write_text(json_out, json.dumps(result, indent=1) + "\n", what="benchmark result")
