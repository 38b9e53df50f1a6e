"""Reliability suite: faults injected into the real entry point, with figures.

    python benchmarks/reliability.py [--trials 20] [--workdir /tmp/byol_reliability] [--quick]

Runs ``python -m byol_flax.main`` on the bundled digits with a tiny model (20 steps, a checkpoint
every 4) as separate processes and reports, as tables and a final JSON line:

1. random ``kill -9`` (1-3 per trial, during a step, during an asynchronous checkpoint save or
   during a restore), then resumed to the end: share of trials whose final state (parameters,
   target, optimizer state, step, RNG, data position, counters) is bitwise equal to an
   uninterrupted run; unrestorable checkpoints; steps redone per kill;
2. SIGTERM: seconds from the signal to a committed checkpoint and a clean exit; steps lost;
3. damaged checkpoints (stale temporary directory, empty step directory, truncated or bit-flipped
   array file in the newest step, every step damaged): where the run resumed from;
4. damaged data (missing, empty, truncated, bit-flipped shard; a record that is not an image):
   the message, and skip-and-count determinism across a resume;
5. bad configs: the exact message the user sees;
6. a NaN injected into the batch of step k: the step named, no checkpoint of a NaN state;
7. resumes under change and the other ways a long run breaks: other worker counts
   (0 -> 2 -> 1, 2 -> 4) and process counts (2 processes with a damaged newest step, then 1),
   changed config keys (refused, then allowed and recorded), a second run on a live workdir,
   SIGTERM and failures with monitors on, single-bit flips under export's verified read and a
   failed re-export, Grain workers after kill -9, a full disk during a save (tmpfs; needs root),
   the keep period, gs:// staging and bad input to data_prep (benchmarks/reliability_data_prep.py).

``--quick`` (what the test suite runs): one trial with one kill, one case of each kind 2-5 and
the in-process cases of 7 (the entry-point cases of 7 are tests in tests/test_train_driver.py),
about 3 minutes on two CPU cores (each process spends ~10 s importing TensorFlow via CLU).
``--only-changes``: the reference, SIGTERM and section 7.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
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
RESTORING_LINE = re.compile(r"restoring checkpoint step (\d+)")
DAMAGE_WORDS = ("cannot be read", "is damaged", "no restorable checkpoint")


# --- Processes ---------------------------------------------------------------------------------


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


# --- The suite -----------------------------------------------------------------------------------


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


def kill_trial(suite: Suite, trial: int) -> dict[str, Any]:
    """1-3 kill -9 at random moments, then a run to the end; compared with the reference."""
    rng = random.Random(trial)
    workdir = suite.root / "kills" / f"trial_{trial:02d}"
    shutil.rmtree(workdir, ignore_errors=True)
    kills = []
    for _ in range(1 if suite.quick else rng.randint(1, 3)):
        committed = committed_steps(workdir)
        mode = rng.choice(["step", "save", "restore"] if committed else ["step", "save"])
        run = suite.start(workdir)
        checkpoints = workdir / "checkpoints"
        if mode == "restore":
            caught = run.wait_for(lambda: "restoring checkpoint step" in run.text)
            time.sleep(rng.uniform(0, 0.05))
        elif mode == "save":
            def saving() -> bool:
                return checkpoints.exists() and any(
                    "tmp" in p.name for p in checkpoints.iterdir()) and run.last_step > 0
            caught = run.wait_for(saving)
        else:
            target = rng.randint(max(run.resumed_from, committed[-1] if committed else 0) + 1,
                                 TOTAL_STEPS - 1)
            caught = run.wait_for(lambda: run.last_step >= target)
            time.sleep(rng.uniform(0, 0.05))
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGKILL)
        run.finish()
        kills.append({"mode": mode, "caught": caught, "last_step": run.last_step,
                      "exit": run.process.returncode})
    final = suite.run(workdir)
    # The step each restart resumed from is in its log; pair it with the kill before it.
    logs = sorted((suite.root / "logs").glob(f"*_trial_{trial:02d}.log"))[-(len(kills) + 1):]
    resumed = []  # the newest committed step each restart found (restore-time kills included)
    for log in logs[1:]:
        match = RESTORING_LINE.search(log.read_text())
        resumed.append(int(match.group(1)) if match else 0)
    for kill, start in zip(kills, resumed):
        kill["resumed_from"] = start
        kill["steps_redone"] = max(kill["last_step"] - start, 0)
    text = "".join(log.read_text() for log in logs)
    return {"trial": trial, "kills": kills, "final_exit": final.process.returncode,
            "bitwise_equal": final.process.returncode == 0 and states_equal(
                final_state(workdir), suite.reference),
            "unrestorable": sum(text.count(word) for word in DAMAGE_WORDS)}


def sigterm_case(suite: Suite) -> tuple[dict[str, Any], Path]:
    """SIGTERM mid-run: time to a committed checkpoint and exit 0; steps lost; exact resume."""
    workdir = suite.root / "sigterm"
    shutil.rmtree(workdir, ignore_errors=True)
    run = suite.start(workdir)
    run.wait_for(lambda: run.last_step >= 10)
    sent = time.perf_counter()
    run.process.send_signal(signal.SIGTERM)
    code = run.finish()
    seconds = time.perf_counter() - sent
    committed = committed_steps(workdir)
    stopped_copy = suite.root / "sigterm_stopped"
    shutil.rmtree(stopped_copy, ignore_errors=True)
    shutil.copytree(workdir, stopped_copy)
    resumed = suite.run(workdir)
    return {"exit": code, "seconds_to_exit": round(seconds, 2), "last_step": run.last_step,
            "checkpoint_step": committed[-1] if committed else None,
            "steps_lost": run.last_step - (committed[-1] if committed else 0),
            "clean_message": "preempted: checkpoint of step" in run.text,
            "resumed_from": resumed.resumed_from,
            "bitwise_equal": resumed.process.returncode == 0 and states_equal(
                final_state(workdir), suite.reference)}, stopped_copy


def largest_file(directory: Path) -> Path:
    return max((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


def flip_bit(path: Path, fraction: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * fraction)] ^= 0x08
    path.write_bytes(bytes(data))


def checkpoint_damage_cases(suite: Suite, stopped: Path) -> list[dict[str, Any]]:
    """Each damage applied to a copy of a run stopped mid-way, then resumed to the end."""
    newest = committed_steps(stopped)[-1]

    def newest_dir(w: Path) -> Path:
        return w / "checkpoints" / str(newest)

    damages = {
        "stale temporary directory": lambda w: (
            w / "checkpoints" / f"{newest + EVERY}.orbax-checkpoint-tmp-1").mkdir(),
        "empty step directory": lambda w: (w / "checkpoints" / str(newest + EVERY)).mkdir(),
        "truncated array file (newest step)": lambda w: (lambda f: f.write_bytes(
            f.read_bytes()[: f.stat().st_size // 2]))(largest_file(newest_dir(w) / "state")),
        "bit flip in array file (newest step)": lambda w: flip_bit(
            largest_file(newest_dir(w) / "state")),
        "every step damaged": lambda w: [flip_bit(largest_file(w / "checkpoints" / str(s) /
                                                                "state"))
                                         for s in committed_steps(w)],
    }
    if suite.quick:
        damages = {k: damages[k] for k in ("bit flip in array file (newest step)",)}
    out = []
    for name, damage in damages.items():
        workdir = suite.root / "damaged_checkpoints" / re.sub(r"\W+", "_", name)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.copytree(stopped, workdir)
        damage(workdir)
        run = suite.run(workdir)
        damaged_named = [line.strip() for line in run.lines if any(w in line for w in DAMAGE_WORDS)]
        out.append({
            "damage": name, "exit": run.process.returncode, "newest_before": newest,
            "resumed_from": run.resumed_from if run.process.returncode == 0 else None,
            "message": (damaged_named[0] if damaged_named else "")[-220:] if run.process.returncode
            == 0 else run.error_line()[-300:],
            "bitwise_equal": run.process.returncode == 0 and states_equal(
                final_state(workdir), suite.reference),
        })
    return out


def rewrite_shard(data_dir: Path, shard_index: int, transform: Callable[[list], list]) -> str:
    """Rewrites one train shard through ``transform`` and updates the manifest's checksum."""
    from byol_flax.data import records  # noqa: PLC0415
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    manifest = records.load_manifest(data_dir)
    split = manifest.splits["train"]
    info = split.shards[shard_index]
    path = data_dir / info.file
    reader = ArrayRecordReader(str(path))
    items = [records.decode_record(raw) for raw in reader.read_all()]
    reader.close()
    new_info = records.write_shard(path, transform(items))
    shards = list(split.shards)
    shards[shard_index] = new_info
    manifest.splits["train"] = dataclasses.replace(split, shards=tuple(shards))
    records.write_manifest(data_dir, manifest)
    return info.file


def data_damage_cases(suite: Suite) -> list[dict[str, Any]]:
    from byol_flax.data import records  # noqa: PLC0415

    source = Path(suite.data_dir)
    first_shard = records.load_manifest(source).splits["train"].shards[0].file

    def not_an_image(items):
        """Every 4th record of the shard: a run of 20 steps draws some of them for sure."""
        return [dataclasses.replace(item, image=b"this is not an image") if i % 4 == 3 else item
                for i, item in enumerate(items)]

    def corrupt_all_shards(d: Path) -> None:
        for index in range(len(records.load_manifest(d).splits["train"].shards)):
            rewrite_shard(d, index, not_an_image)

    damages: dict[str, tuple[Callable[[Path], Any], list[str]]] = {
        "missing shard": (lambda d: (d / first_shard).unlink(), []),
        "empty shard": (lambda d: (d / first_shard).write_bytes(b""), []),
        "truncated shard": (lambda d: (d / first_shard).write_bytes(
            (d / first_shard).read_bytes()[:100]), []),
        "bit-flipped shard": (lambda d: flip_bit(d / first_shard), []),
        "records that are not images (no skips allowed)": (corrupt_all_shards, []),
        "records that are not images (max_skipped_records=1000)": (
            corrupt_all_shards, ["--config.data.max_skipped_records=1000"]),
        "records that are not images (max_skipped_records=5)": (
            corrupt_all_shards, ["--config.data.max_skipped_records=5"]),
    }
    if suite.quick:
        damages = {k: damages[k] for k in ("bit-flipped shard",)}
    out = []
    for name, (damage, extra) in damages.items():
        data_dir = suite.root / "damaged_data" / re.sub(r"\W+", "_", name)
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(source, data_dir)
        damage(data_dir)
        workdir = data_dir.with_name(data_dir.name + "_run")
        shutil.rmtree(workdir, ignore_errors=True)
        started = time.perf_counter()
        run = suite.run(workdir, *extra, data_dir=str(data_dir))
        case = {"damage": name, "exit": run.process.returncode,
                "seconds": round(time.perf_counter() - started, 1),
                "message": run.error_line()[-300:] if run.process.returncode else "",
                "names_file": ".array_record" in run.error_line()}
        if run.process.returncode == 0:  # skip-and-count: same count after a kill and resume
            skipped = final_state(workdir)[2].get("skipped_records")
            again = data_dir.with_name(data_dir.name + "_killed")
            shutil.rmtree(again, ignore_errors=True)
            killed = suite.start(again, *extra, data_dir=str(data_dir))
            killed.wait_for(lambda: killed.last_step >= 9)
            killed.process.send_signal(signal.SIGKILL)
            killed.finish()
            resumed = suite.run(again, *extra, data_dir=str(data_dir))
            case |= {"skipped_records": skipped,
                     "skipped_after_kill_and_resume": final_state(again)[2].get("skipped_records"),
                     "resumed_from": resumed.resumed_from}
        out.append(case)
    return out


BAD_CONFIGS = [  # (what, extra flags, devices, expected fragment of the message)
    ("typo in a key", ["--config.training.batchsize=16"], 1, "batchsize"),
    ("wrong type", ["--config.training.batch_size=sixteen"], 1, "sixteen"),
    ("batch not divisible by the devices", ["--config.training.batch_size=12"], 8,
     "config.training.batch_size=12 must be divisible"),
    ("negative learning rate", ["--config.optimizer.base_learning_rate=-0.1"], 1,
     "config.optimizer.base_learning_rate=-0.1"),
    ("unknown encoder", ["--config.model.encoder.name=resnet51"], 1,
     "config.model.encoder.name='resnet51'"),
    ("unknown predictor", ["--config.model.predictor.kind=mlpp"], 1,
     "config.model.predictor.kind='mlpp'"),
    ("unknown target kind", ["--config.target.kind=sg"], 1, "config.target.kind='sg'"),
    ("warm-up longer than training", ["--config.training.warmup_epochs=10"], 1,
     "config.training.warmup_epochs=10"),
    ("data directory that does not exist", ["--config.data.dir=/nonexistent/digits"], 1,
     "/nonexistent/digits"),
    ("number of classes differs from the data", ["--config.data.num_classes=11"], 1,
     "num_classes"),
    ("workdir that cannot be written", ["--workdir=/proc/byol_reliability_run"], 1,
     "cannot write to the workdir"),
    ("resuming with a different architecture", ["--config.model.projector.output_size=32"], 1,
     "model.projector.output_size: checkpoint 16, config 32"),
]


def bad_config_cases(suite: Suite) -> list[dict[str, Any]]:
    cases = BAD_CONFIGS if not suite.quick else [BAD_CONFIGS[5]]
    out = []
    for what, extra, devices, expected in cases:
        workdir = suite.root / "bad_configs" / re.sub(r"\W+", "_", what)
        shutil.rmtree(workdir, ignore_errors=True)
        if what.startswith("resuming"):
            shutil.copytree(suite.root / "reference", workdir)
        env = subprocess_env(suite.root / "jax_cache", devices)
        run = suite.run(workdir, *extra, env=env)
        line = run.error_line()
        out.append({"case": what, "flags": " ".join(extra), "exit": run.process.returncode,
                    "message": line[-300:], "as_expected": run.process.returncode != 0
                    and expected in run.text})
    return out


NAN_PROGRAM = """
import sys
import numpy as np
from absl import app
import byol_flax.train as train
from byol_flax import main
bad_step = int(sys.argv.pop(1))
original, calls = train.views_only, {"n": 0}
def views_with_nan(batch, keys=("view1", "view2")):
    calls["n"] += 1  # one call per step; all batches as floats so one program runs throughout
    views = {k: v.astype(np.float32) / 255.0 if k.startswith("view") else v
             for k, v in original(batch, keys).items()}
    if calls["n"] == bad_step:
        views["view1"][0, 0, 0, 0] = np.nan
    return views
train.views_only = views_with_nan
app.run(main.main)
"""


def nan_case(suite: Suite, bad_step: int) -> dict[str, Any]:
    workdir = suite.root / "nan"
    shutil.rmtree(workdir, ignore_errors=True)
    run = suite.run(workdir, program=[sys.executable, "-c", NAN_PROGRAM, str(bad_step)])
    match = re.search(r"NonFiniteLossError: .* at step (\d+)", run.text)
    named = int(match.group(1)) if match else None
    steps = committed_steps(workdir)
    finite = all(np.all(np.isfinite(v)) for v in final_state(workdir)[0].values()
                 if v.dtype.kind == "f") if steps else True
    return {"injected_at_step": bad_step, "exit": run.process.returncode,
            "step_named": named, "message": run.error_line()[-300:],
            "checkpoints": steps, "checkpoint_at_or_after_nan": any(s >= bad_step for s in steps),
            "saved_checkpoints_finite": finite}


# --- Resume under change -------------------------------------------------------------------


def kill_when(run: Run, condition: Callable[[], bool]) -> None:
    """kill -9 ``run`` once ``condition()`` holds (or it ended by itself)."""
    run.wait_for(condition)
    if run.process.poll() is None:
        run.process.send_signal(signal.SIGKILL)
    run.finish()


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def worker_cases(suite: Suite) -> list[dict[str, Any]]:
    """Resumes that change the number of Grain workers: bitwise the uninterrupted run."""
    chains = {"workers 0 -> 2 -> 1": [0, 2, 1], "workers 2 -> 4": [2, 4]}
    out = []
    for name, counts in chains.items():
        workdir = fresh(suite.root / "changes" / re.sub(r"\W+", "_", name))
        resumed = []
        for count in counts[:-1]:
            newest = (committed_steps(workdir) or [0])[-1]
            run = suite.start(workdir, f"--config.data.worker_count={count}")
            kill_when(run, lambda: (committed_steps(workdir) or [0])[-1] > newest)
            resumed.append(run.resumed_from)
        last = suite.run(workdir, f"--config.data.worker_count={counts[-1]}")
        resumed.append(last.resumed_from)
        out.append({"case": name, "exit": last.process.returncode, "resumed_from": resumed,
                    "message": last.error_line()[-200:] if last.process.returncode else "",
                    "bitwise_equal": last.process.returncode == 0 and states_equal(
                        final_state(workdir), suite.reference)})
    return out


def alter_checksum(step_dir: Path) -> None:
    """Makes one array of a step disagree with its saved checksum (what a flipped bit in its
    data does; where a flipped byte of Orbax's shared data files lands is not chosen here)."""
    path = step_dir / "integrity" / "metadata"
    record = json.loads(path.read_text())
    key = sorted(record["checksums"])[0]
    record["checksums"][key] = (record["checksums"][key] + 1) % 2**32
    path.write_text(json.dumps(record))


def two_process_case(suite: Suite) -> dict[str, Any]:
    """2 processes killed after two checkpoints, the newest damaged, resumed on 2 processes
    (they must agree on the older step), killed, then resumed on 1 process with 2 devices:
    bitwise the uninterrupted 1-process 2-device run."""
    env2 = subprocess_env(suite.root / "jax_cache", devices=2)
    reference = fresh(suite.root / "changes" / "reference_2_devices")
    suite.run(reference, env=env2)
    workdir = fresh(suite.root / "changes" / "processes_2_to_1")

    def launch() -> list[Run]:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        return [suite.start(workdir, f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}") for i in range(2)]

    runs = launch()
    runs[0].wait_for(lambda: len(committed_steps(workdir)) >= 2)
    for run in runs:
        kill_when(run, lambda: True)
    *_, before, newest = committed_steps(workdir)
    alter_checksum(workdir / "checkpoints" / str(newest))
    runs = launch()
    for run in runs:
        run.wait_for(lambda run=run: run.resumed_from > 0)
    restored = [run.resumed_from for run in runs]
    for run in runs:
        kill_when(run, lambda: True)
    last = suite.run(workdir, env=env2)
    return {"case": "2 processes, newest step damaged, then 1 process",
            "exit": last.process.returncode, "damaged_step": newest,
            "restored_by_each_process": restored,
            "processes_agree": len(set(restored)) == 1 and restored[0] == before,
            "resumed_from": last.resumed_from,
            "bitwise_equal": last.process.returncode == 0 and states_equal(
                final_state(workdir), final_state(reference))}


def config_change_cases(suite: Suite, stopped: Path) -> list[dict[str, Any]]:
    """Changed keys on resume: refused with old -> new (never called damaged), then allowed."""
    changes = {
        "predictor_lr_multiplier 1 -> 2": ["--config.optimizer.predictor_lr_multiplier=2.0"],
        "batch 16 -> 32 and epochs 4 -> 8": ["--config.training.batch_size=32",
                                             "--config.training.epochs=8"],
    }
    out = []
    for name, flags in changes.items():
        workdir = fresh(suite.root / "changes" / re.sub(r"\W+", "_", name))
        shutil.copytree(stopped, workdir)
        before = (workdir / "config.json").read_text()
        refused = suite.run(workdir, *flags)
        keys = ",".join(f.split("=")[0].removeprefix("--config.") for f in flags)
        line = refused.error_line()
        row = {"case": name, "refused_exit": refused.process.returncode,
               "message": line[:300] + (" ..." if len(line) > 300 else ""),
               "called_damaged": "damaged" in line,
               "config_json_kept": (workdir / "config.json").read_text() == before}
        allowed = suite.run(workdir, *flags, f"--allow_config_change={keys}")
        history = workdir / "config_history.jsonl"
        row |= {"allowed_exit": allowed.process.returncode,
                "allowed_resumed_from": allowed.resumed_from,
                "history": [(h["key"], h["old"], h["new"]) for h in map(
                    json.loads, history.read_text().splitlines()) if h["kind"] == "trained"]
                if history.exists() else []}
        row["as_expected"] = (
            row["refused_exit"] == 1 and line.startswith("error: ConfigChangeError")
            and not row["called_damaged"] and row["config_json_kept"]
            and row["allowed_exit"] == 0 and len(row["history"]) == len(flags))
        out.append(row)
    return out


def shared_workdir_case(suite: Suite) -> dict[str, Any]:
    """A second start on a workdir in use stops at once; the first run is unharmed. The first
    run is paused (SIGSTOP: alive, mid-run) while the second starts, so the toy run cannot
    finish first."""
    workdir = fresh(suite.root / "changes" / "shared_workdir")
    first = suite.start(workdir)
    first.wait_for(lambda: first.last_step >= 2)
    first.process.send_signal(signal.SIGSTOP)
    started = time.perf_counter()
    try:
        second = suite.run(workdir)
    finally:
        first.process.send_signal(signal.SIGCONT)
    seconds = time.perf_counter() - started
    first.finish()
    return {"case": "second run on a live workdir", "second_exit": second.process.returncode,
            "second_seconds": round(seconds, 1), "message": second.error_line()[-220:],
            "first_exit": first.process.returncode,
            "first_bitwise_equal": first.process.returncode == 0 and states_equal(
                final_state(workdir), suite.reference)}


FAILING_MONITOR_PROGRAM = """
from absl import app
from byol_flax import main
from byol_flax.evaluation import EVALUATORS

class Failing:
    needs_labels = reads_monitor_data = False
    def __init__(self, config, mesh, **kwargs):
        pass
    def run(self, subject):
        raise RuntimeError("injected monitor failure")

EVALUATORS.register("failing")(Failing)
app.run(main.main)
"""


def monitor_cases(suite: Suite) -> list[dict[str, Any]]:
    """Monitors run after the step's save: SIGTERM during a monitoring run, a monitor that
    raises (training goes on), and the same monitor made fatal (its step is saved first)."""
    out = []
    workdir = fresh(suite.root / "changes" / "sigterm_with_monitors")
    run = suite.start(workdir, "--config.monitor.every_steps=4",
                      "--config.monitor.max_train_examples=500")
    run.wait_for(lambda: run.last_step >= 8)
    sent = time.perf_counter()
    run.process.send_signal(signal.SIGTERM)
    run.finish()
    committed = committed_steps(workdir)
    out.append({"case": "SIGTERM with kNN + online classifier monitors every 4 steps",
                "exit": run.process.returncode,
                "seconds_to_exit": round(time.perf_counter() - sent, 2),
                "steps_lost": run.last_step - (committed[-1] if committed else 0),
                "as_expected": run.process.returncode == 0 and committed
                and committed[-1] == run.last_step})
    program = [sys.executable, "-c", FAILING_MONITOR_PROGRAM]
    flags = ["--config.monitor.every_steps=8", "--config.monitor.evaluators=failing"]
    workdir = fresh(suite.root / "changes" / "failing_monitor")
    run = suite.run(workdir, *flags, program=program)
    out.append({"case": "monitor raises", "exit": run.process.returncode,
                "logged": "monitor failing failed" in run.text and "Traceback" in run.text,
                "as_expected": run.process.returncode == 0 and "monitor_errors/failing" in run.text
                and states_equal(final_state(workdir), suite.reference)})
    workdir = fresh(suite.root / "changes" / "fatal_monitor")
    run = suite.run(workdir, *flags, "--config.monitor.errors_are_fatal=true", program=program)
    out.append({"case": "monitor raises, errors_are_fatal", "exit": run.process.returncode,
                "checkpoints": committed_steps(workdir),
                "as_expected": run.process.returncode != 0 and 8 in committed_steps(workdir)})
    return out


def verified_read_cases(suite: Suite, stopped: Path, flips: int) -> list[dict[str, Any]]:
    """``evaluate --source=WORKDIR`` and ``export`` read through the verified path: single-bit
    flips spread over the newest step's files never load a wrong encoder silently; a failed
    re-export leaves the previous export intact."""
    from byol_flax.export import encoder as export
    from byol_flax.export import model_card  # noqa: PLC0415

    newest = committed_steps(stopped)[-1]
    truth = export.load_pretraining_encoder(stopped, newest)
    true_arrays = [np.asarray(x) for x in jax_leaves(truth.encoder)]
    files = sorted(f for f in (stopped / "checkpoints" / str(newest)).rglob("*") if f.is_file())
    outcomes = {"fell back to an older step": 0, "refused": 0, "newest step, encoder intact": 0,
                "silently wrong": 0}
    for index in range(flips):
        workdir = fresh(suite.root / "changes" / "flips")
        shutil.copytree(stopped / "checkpoints", workdir / "checkpoints")
        target = files[index % len(files)]
        flip_bit(workdir / target.relative_to(stopped), fraction=(index * 0.618) % 1.0)
        try:
            loaded = export.load_pretraining_encoder(workdir)
        except Exception:  # noqa: BLE001 - a refusal is an acceptable outcome
            outcomes["refused"] += 1
            continue
        if loaded.origin["step"] != newest:
            outcomes["fell back to an older step"] += 1
        elif all(np.array_equal(a, np.asarray(b)) for a, b in
                 zip(true_arrays, jax_leaves(loaded.encoder))):
            outcomes["newest step, encoder intact"] += 1
        else:
            outcomes["silently wrong"] += 1
    out = [{"case": f"{flips} single-bit flips in the newest step, then export's read",
            **outcomes, "as_expected": outcomes["silently wrong"] == 0}]
    destination = fresh(suite.root / "changes" / "export")
    model_card.export_with_model_card(str(stopped), str(destination))
    before = sorted(str(p.relative_to(destination)) for p in destination.rglob("*"))

    def fail(directory):
        raise OSError("disk full (injected)")

    try:
        export.export_encoder(truth, destination, write_extra=fail)
        failed = False
    except OSError:
        failed = True
    after = sorted(str(p.relative_to(destination)) for p in destination.rglob("*"))
    export.load_export(destination)
    out.append({"case": "re-export fails half-way", "failed": failed,
                "as_expected": failed and before == after})
    return out


def jax_leaves(module) -> list:
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    return jax.tree.leaves(nnx.state(module))


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


def orphan_case(suite: Suite) -> dict[str, Any]:
    """kill -9 of a trainer with 2 Grain workers: the workers exit by themselves."""
    workdir = fresh(suite.root / "changes" / "orphans")
    run = suite.start(workdir, "--config.data.worker_count=2")
    run.wait_for(lambda: run.last_step >= 3)
    workers = children(run.process.pid)
    run.process.send_signal(signal.SIGKILL)
    run.finish()
    deadline = time.monotonic() + 30
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in workers if process_alive(pid)]
    for pid in alive:  # do not leave them to the next case
        os.kill(pid, signal.SIGKILL)
    return {"case": "kill -9 with worker_count=2", "workers": len(workers),
            "alive_after_30s": len(alive), "as_expected": len(workers) >= 2 and not alive}


def disk_full_case(suite: Suite) -> dict[str, Any]:
    """checkpoints/ on a 10 MB tmpfs (a step is ~3.8 MB): the third save fails. Needs root to
    mount; reported as skipped otherwise."""
    workdir = fresh(suite.root / "changes" / "disk_full")
    mount = workdir / "checkpoints"
    mount.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode:
        return {"case": "disk full during an asynchronous save", "skipped": mounted.stderr.strip(),
                "as_expected": True}
    try:
        run = suite.run(workdir, "--noverbose")  # the console a user sees
        line = next((x.strip() for x in run.lines if x.startswith("error: ")), "")
        committed = committed_steps(workdir)
        return {"case": "disk full during an asynchronous save", "exit": run.process.returncode,
                "message": line, "committed": committed,
                "task_exception_blocks": run.text.count("never retrieved"),
                "console_lines": len(run.lines),
                "as_expected": run.process.returncode == 1
                and line.startswith("error: CheckpointWriteError") and str(mount) in line
                and f"last intact checkpoint is step {committed[-1]}" in line
                and "never retrieved" not in run.text and len(run.lines) < 30}
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def retention_case(suite: Suite) -> dict[str, Any]:
    workdir = fresh(suite.root / "changes" / "keep_period")
    run = suite.run(workdir, "--config.checkpoint.keep_period=8",
                    "--config.checkpoint.max_to_keep=2")
    steps = committed_steps(workdir)
    return {"case": "keep_period=8, max_to_keep=2", "exit": run.process.returncode,
            "kept": steps, "as_expected": steps == [8, 16, 20]}


# --- Report --------------------------------------------------------------------------------------


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")).replace("|", "/") for c in columns)
                     + " |")
    return "\n".join(lines)


def change_results(suite: Suite, stopped: Path) -> dict[str, Any]:
    """Resumes under change and the other ways a long run breaks."""
    spec = importlib.util.spec_from_file_location(  # beside this file, not a package
        "reliability_data_prep", Path(__file__).with_name("reliability_data_prep.py"))
    reliability_data_prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability_data_prep)

    # --quick (the test suite): the in-process cases only; tests/test_train_driver.py runs the
    # entry point through worker and process changes, a changed recipe and a shared workdir.
    out: dict[str, Any] = {"workers": [] if suite.quick else worker_cases(suite)}
    out["processes"] = None if suite.quick else two_process_case(suite)
    out["config_changes"] = [] if suite.quick else config_change_cases(suite, stopped)
    out["shared_workdir"] = None if suite.quick else shared_workdir_case(suite)
    out["monitors"] = [] if suite.quick else monitor_cases(suite)
    out["verified_reads"] = verified_read_cases(suite, stopped, flips=6 if suite.quick else 46)
    out["orphans"] = None if suite.quick else orphan_case(suite)
    out["disk_full"] = None if suite.quick else disk_full_case(suite)
    out["retention"] = None if suite.quick else retention_case(suite)
    out["staging"] = reliability_data_prep.staging_cases(fresh(suite.root / "staging"))
    out["data_prep"] = reliability_data_prep.data_prep_cases(fresh(suite.root / "data_prep"))
    return out


def change_targets(changes: dict[str, Any]) -> dict[str, bool]:
    ran = lambda key: changes.get(key) is not None  # noqa: E731
    targets = {
        "resume_with_other_workers_bitwise": all(c["bitwise_equal"] for c in changes["workers"]),
        "config_changes_refused_not_damaged_then_allowed": all(
            c["as_expected"] for c in changes["config_changes"]),
        "verified_reads_never_silently_wrong_and_export_atomic": all(
            c["as_expected"] for c in changes["verified_reads"]),
        "staging_as_expected": all(c["as_expected"] for c in changes["staging"]),
        "data_prep_bad_input_as_expected": all(c["as_expected"] for c in changes["data_prep"]),
    }
    if ran("processes"):
        p = changes["processes"]
        targets["two_processes_agree_then_one_process_bitwise"] = (
            p["processes_agree"] and p["bitwise_equal"])
    if ran("shared_workdir"):
        w = changes["shared_workdir"]
        targets["second_run_refused_first_unharmed"] = (
            w["second_exit"] == 1 and "WorkdirBusyError" in w["message"]
            and w["first_bitwise_equal"])
    if changes["monitors"]:
        targets["monitors_after_save_and_not_fatal"] = all(
            c["as_expected"] for c in changes["monitors"])
    for key in ("orphans", "disk_full", "retention"):
        if ran(key):
            targets[f"{key}_as_expected"] = bool(changes[key]["as_expected"])
    return targets


def run_suite(root: Path, *, trials: int, quick: bool, seed: int = 0,
              only_changes: bool = False) -> dict[str, Any]:
    from byol_flax.studies.runner import prepare_data  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    from etils import epath  # noqa: PLC0415

    suite = Suite(root, prepare_data(epath.Path(root)), quick)
    started = time.perf_counter()
    reference = suite.reference_run()
    results: dict[str, Any] = {"reference": reference}
    trials_out = [kill_trial(suite, seed * 1000 + t)
                  for t in range(0 if only_changes else trials)]
    kills = [k for t in trials_out for k in t["kills"]]
    redone = [k["steps_redone"] for k in kills if "steps_redone" in k]
    results["kill9"] = {
        "trials": len(trials_out), "kills": len(kills),
        "kills_by_mode": {m: sum(k["mode"] == m for k in kills) for m in ("step", "save",
                                                                        "restore")},
        "bitwise_equal_share": sum(t["bitwise_equal"] for t in trials_out) / max(len(trials_out),
                                                                                  1),
        "unrestorable_checkpoints": sum(t["unrestorable"] for t in trials_out),
        "steps_redone_mean": float(np.mean(redone)) if redone else 0.0,
        "steps_redone_max": max(redone, default=0), "save_interval": EVERY,
        "details": trials_out}
    sigterm, stopped = sigterm_case(suite)
    results["sigterm"] = sigterm
    results["targets"] = {}
    if not only_changes:
        results["damaged_checkpoints"] = checkpoint_damage_cases(suite, stopped)
        results["damaged_data"] = data_damage_cases(suite)
        results["bad_configs"] = bad_config_cases(suite)
        # The NaN run compiles its own (float-input) program: ~1 min, not in the quick subset.
        results["nan"] = None if quick else nan_case(suite, bad_step=7)
        results["targets"] = {
            "kill9_bitwise_equal_share_is_1": results["kill9"]["bitwise_equal_share"] == 1.0,
            "no_unrestorable_checkpoint": results["kill9"]["unrestorable_checkpoints"] == 0,
            # Asynchronous saves: Orbax keeps at most one save in flight (the next save waits
            # for it), so a kill just before save k commits goes back to save k - 1: 2 intervals.
            "steps_redone_within_two_save_intervals":
                results["kill9"]["steps_redone_max"] <= 2 * EVERY,
            "sigterm_no_step_lost": sigterm["steps_lost"] == 0 and sigterm["exit"] == 0,
            "damaged_checkpoints_handled": all(
                (c["exit"] == 0 and c["bitwise_equal"]) or (c["exit"] != 0 and "damaged" in
                                                             c["message"])
                for c in results["damaged_checkpoints"]),
            "damaged_data_named_or_counted": all(
                c["names_file"] or ("skipped" in c["message"]
                                    and "max_skipped_records" in c["message"])
                or (c["exit"] == 0 and c.get("skipped_records", 0) > 0
                    and c.get("skipped_records") == c.get("skipped_after_kill_and_resume"))
                for c in results["damaged_data"]),
            "bad_configs_named": all(c["as_expected"] for c in results["bad_configs"]),
        }
        if results["nan"] is not None:
            results["targets"]["nan_named_and_not_saved"] = (
                results["nan"]["step_named"] == 7
                and not results["nan"]["checkpoint_at_or_after_nan"]
                and results["nan"]["saved_checkpoints_finite"])
    results["changes"] = change_results(suite, stopped)
    results["targets"] |= change_targets(results["changes"])
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def report(results: dict[str, Any]) -> str:
    k = results["kill9"]
    c = results["changes"]
    parts = [
        "## kill -9", table([{**{key: k[key] for key in (
            "trials", "kills", "kills_by_mode", "bitwise_equal_share", "unrestorable_checkpoints",
            "steps_redone_mean", "steps_redone_max", "save_interval")}}],
            ["trials", "kills", "kills_by_mode", "bitwise_equal_share",
             "unrestorable_checkpoints", "steps_redone_mean", "steps_redone_max",
             "save_interval"]),
        "## SIGTERM", table([results["sigterm"]], list(results["sigterm"])),
    ]
    if "damaged_checkpoints" in results:
        parts += [
            "## Damaged checkpoints", table(results["damaged_checkpoints"],
                                            ["damage", "exit", "newest_before", "resumed_from",
                                             "bitwise_equal", "message"]),
            "## Damaged data", table(results["damaged_data"],
                                     ["damage", "exit", "names_file", "message",
                                      "skipped_records", "skipped_after_kill_and_resume"]),
            "## Bad configs", table(results["bad_configs"], ["case", "flags", "exit", "message"]),
            "## NaN injection", table([results["nan"]], list(results["nan"])) if results["nan"]
            else "(not in --quick)",
        ]
    single = lambda key: table([c[key]], list(c[key])) if c.get(key) else "(not in --quick)"  # noqa: E731
    rows = lambda key: table(c[key], list(dict.fromkeys(  # noqa: E731
        k for row in c[key] for k in row))) if c.get(key) else "(not in --quick)"
    parts += [
        "## Resume with other worker counts", rows("workers"),
        "## Resume with other process counts (and a damaged step under 2 processes)",
        single("processes"),
        "## Config changes on resume", rows("config_changes"),
        "## Two runs on one workdir", single("shared_workdir"),
        "## Monitors", rows("monitors"),
        "## Evaluate / export read verified checkpoints", rows("verified_reads"),
        "## Grain workers after kill -9", single("orphans"),
        "## Disk full during a save", single("disk_full"),
        "## Retention", single("retention"),
        "## gs:// staging", rows("staging"),
        "## data_prep bad input", rows("data_prep"),
        "## Targets", table([{"target": t, "met": v} for t, v in results["targets"].items()],
                            ["target", "met"]),
    ]
    return "\n\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill -9 trials")
    parser.add_argument("--workdir", default="/tmp/byol_reliability")
    parser.add_argument("--quick", action="store_true", help="the test suite's subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only-changes", action="store_true",
                        help="the reference, SIGTERM and the resume-under-change cases only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    trials = min(args.trials, 1) if args.quick else args.trials
    results = run_suite(Path(args.workdir).absolute(), trials=trials, quick=args.quick,
                        seed=args.seed, only_changes=args.only_changes)
    print(report(results))
    summary = {key: value for key, value in results.items() if key != "kill9"}
    summary["kill9"] = {k: v for k, v in results["kill9"].items() if k != "details"}
    print(json.dumps(summary, default=str))
    (Path(args.workdir) / "reliability.json").write_text(json.dumps(results, indent=2,
                                                                    default=str))
    return 0 if all(results["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
