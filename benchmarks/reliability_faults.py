"""Sections 1-6 of the reliability suite: faults injected into runs of the real entry point.

``kill -9`` at random moments (then resumed bitwise), SIGTERM, damaged checkpoints, damaged data,
bad configs and a NaN in one step's batch; each case returns rows for the report.
"""

import dataclasses
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.reliability_processes import (
    EVERY,
    TOTAL_STEPS,
    Suite,
    committed_steps,
    final_state,
    states_equal,
    subprocess_env,
)

RESTORING_LINE = re.compile(r"restoring checkpoint step (\d+)")
DAMAGE_WORDS = ("cannot be read", "is damaged", "no restorable checkpoint")


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
    from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

    from byol_flax.data import records  # noqa: PLC0415

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
