"""Section 7 of the reliability suite: resumes under change and the other ways a long run breaks.

Other worker and process counts, changed config keys, a second run on a live workdir, monitors,
single-bit flips under export's verified read, Grain workers after ``kill -9``, a full disk,
the keep period, and (from :mod:`benchmarks.reliability_data_prep`) gs:// staging and bad input
to the converters. :func:`change_results` runs them, :func:`change_targets` judges them.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import reliability_data_prep
from benchmarks.reliability_faults import flip_bit
from benchmarks.reliability_processes import (
    Run,
    Suite,
    children,
    committed_steps,
    final_state,
    fresh,
    kill_when,
    process_alive,
    states_equal,
    subprocess_env,
)


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
    from byol_flax.weights import encoder as weights

    newest = committed_steps(stopped)[-1]
    truth = weights.load_pretraining_encoder(stopped, newest)
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
            loaded = weights.load_pretraining_encoder(workdir)
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
    weights.load_export(destination)
    out.append({"case": "re-export fails half-way", "failed": failed,
                "as_expected": failed and before == after})
    return out


def jax_leaves(module) -> list:
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    return jax.tree.leaves(nnx.state(module))


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


def change_results(suite: Suite, stopped: Path) -> dict[str, Any]:
    """Resumes under change and the other ways a long run breaks."""
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
    ran = lambda key: changes.get(key) is not None
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
