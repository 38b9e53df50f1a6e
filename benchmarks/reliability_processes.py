"""The reliability suite's processes: the real entry point started, followed, killed and read.

Each run is ``python -m byol_flax.main`` on the bundled digits with a tiny model (20 steps, a
checkpoint every 4; :func:`shrink_flags`), its stderr followed line by line (:class:`Run`), and
its newest checkpoint read back bitwise (:func:`final_state`). The tests use these helpers too
(``from benchmarks.reliability_processes import Run, committed_steps, ...``).
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS, EVERY = 20, 4


def shrink_flags(num_train_examples: int, logging_every: int) -> list[str]:
    """Overrides making byol_flax/configs/digits_cpu.py a seconds-long run: the smoke switch's
    pre-training sizes (``byol_flax.configs.common.SMOKE_PRETRAINING``, as flags: the config
    argument is the data directory), then the suite's own step count and cadences: batch 16, 4
    epochs of ``num_train_examples``, 32-16 heads (fast steps to kill), a checkpoint every EVERY
    steps, every ``logging_every`` steps logged, no monitors."""
    from byol_flax.configs.common import SMOKE_PRETRAINING  # noqa: PLC0415

    overrides = {**SMOKE_PRETRAINING, "training.batch_size": 16,
                 "training.num_train_examples": num_train_examples, "training.epochs": 4,
                 "model.projector.hidden_size": 32, "model.projector.output_size": 16,
                 "model.predictor.hidden_size": 32, "checkpoint.every_steps": EVERY,
                 "logging.every_steps": logging_every, "monitor.every_steps": 0}
    return [f"--config.{key}={value}" for key, value in overrides.items()]


# 80 examples per "epoch" at batch 16: 5 steps per epoch, 20 steps in all; every step logged.
SHRINK = shrink_flags(num_train_examples=80, logging_every=1)
STEP_LINE = re.compile(r"logging_writer\.py:\d+\] \[(\d+)\] ")
RESUMED_LINE = re.compile(r"resuming at step (\d+)")


def subprocess_env(cache_dir: Path, devices: int = 1) -> dict[str, str]:
    """One CPU device (unless asked), and a shared persistent compilation cache so that every
    restart of the entry point compiles nothing."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "",
            "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def entry_point(data_dir: str, workdir: Path, *extra: str,
                program: Sequence[str] = ()) -> list[str]:
    return [*(program or [sys.executable, "-m", "byol_flax.main"]),
            f"--config={REPO / 'byol_flax' / 'configs' / 'digits_cpu.py'}:{data_dir}",
            f"--workdir={workdir}", "--verbose", *SHRINK, *extra]


class Run:
    """A subprocess whose stderr is followed line by line (steps done, resume point)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path):
        self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.log = log
        self.lines: list[str] = []
        self.last_step = 0
        self.resumed_from = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with self.log.open("a") as out:
            for line in self.process.stderr:
                out.write(line)
                self.lines.append(line)
                if match := STEP_LINE.search(line):
                    self.last_step = max(self.last_step, int(match.group(1)))
                if match := RESUMED_LINE.search(line):
                    self.resumed_from = int(match.group(1))

    def wait_for(self, condition: Callable[[], bool], timeout: float = 300) -> bool:
        """Polls ``condition`` every millisecond; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return condition()
            time.sleep(0.001)
        raise TimeoutError(f"condition not met in {timeout}s; see {self.log}")

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def error_line(self) -> str:
        """The line that tells the user what went wrong (our one-line error or Python's last)."""
        for line in reversed(self.lines):
            if line.startswith(("error: ", "FATAL Flags parsing error")) or re.match(
                    r"^[\w.]+(Error|Exception)\b", line):
                return line.strip()
        return self.lines[-1].strip() if self.lines else ""


def committed_steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.exists() else []


def final_state(workdir: Path) -> tuple[dict[str, np.ndarray], list[Any], dict[str, Any]]:
    """(every array, data position, loop counters) of the newest checkpoint."""
    import jax  # noqa: PLC0415 - the harness itself needs no JAX until here
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = workdir / "checkpoints" / str(committed_steps(workdir)[-1])
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(  # any topology (1 or 2 processes) onto one local device
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path / "state").item_metadata.tree)
    state = checkpointer.restore(path / "state", target=abstract)
    flat: dict[str, np.ndarray] = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}/{key}")
            else:
                flat[f"{prefix}/{key}"] = np.asarray(value)

    walk(state)
    integrity = path / "integrity" / "metadata"
    counters = json.loads(integrity.read_text()).get("counters", {}) if integrity.exists() else {}
    return flat, counters.get("examples_consumed"), counters


def states_equal(a: tuple, b: tuple) -> bool:
    arrays_a, data_a, counters_a = a
    arrays_b, data_b, counters_b = b
    return (arrays_a.keys() == arrays_b.keys() and data_a == data_b and counters_a == counters_b
            and all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a))


@dataclasses.dataclass
class Suite:
    root: Path
    data_dir: str
    quick: bool
    reference: tuple | None = None
    logs: int = 0

    @property
    def env(self) -> dict[str, str]:
        return subprocess_env(self.root / "jax_cache")

    def start(self, workdir: Path, *extra: str, program: Sequence[str] = (),
              env: dict[str, str] | None = None, data_dir: str | None = None) -> Run:
        self.logs += 1
        log = self.root / "logs" / f"{self.logs:03d}_{workdir.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        return Run(entry_point(data_dir or self.data_dir, workdir, *extra, program=program),
                   env or self.env, log)

    def run(self, workdir: Path, *extra: str, **kwargs) -> Run:
        run = self.start(workdir, *extra, **kwargs)
        run.finish()
        return run

    def reference_run(self) -> dict[str, Any]:
        started = time.perf_counter()
        run = self.run(self.root / "reference")
        assert run.process.returncode == 0, run.text[-3000:]
        self.reference = final_state(self.root / "reference")
        return {"seconds": time.perf_counter() - started, "steps": run.last_step}


def kill_when(run: Run, condition: Callable[[], bool]) -> None:
    """kill -9 ``run`` once ``condition()`` holds (or it ended by itself)."""
    run.wait_for(condition)
    if run.process.poll() is None:
        run.process.send_signal(signal.SIGKILL)
    run.finish()


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", text, re.M):
            out.append(int(status.parent.name))
    return out


def process_alive(pid: int) -> bool:
    """Running (a zombie has exited: its parent is gone and init reaps it)."""
    try:
        return "State:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return False
