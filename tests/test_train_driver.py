"""The real entry point end to end: checkpoints, TensorBoard, resumes under change (worker and
process counts, a changed recipe, a damaged step under 2 processes, a second run on the same
workdir), config errors and the non-finite-loss stop. Runs byol_flax/configs/digits_cpu.py,
shrunk."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.reliability_processes import EVERY, Run, committed_steps, final_state, shrink_flags
from byol_flax.config import ConfigError, validate_config
from byol_flax.configs import digits_cpu
from byol_flax.data.convert import digits
from tests.helpers import metrics_by_step

REPO = Path(__file__).resolve().parents[1]
# Exact-resume checks (kill -9 at random moments, SIGTERM, damaged checkpoints and data, NaN)
# live in benchmarks/reliability.py; tests/test_reliability.py runs its fast subset. Its process
# helpers (benchmarks/reliability_processes.py) start runs and read committed checkpoints here too.
# 64 examples per "epoch" at batch 16: 4 steps per epoch, 16 steps in all.
SHRINK = shrink_flags(num_train_examples=64, logging_every=4)
TOTAL_STEPS = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--out", str(out), "--holdout-count", "100", "--no-progress"]) == 0
    return str(out)


def entry_point(data_dir: str, workdir: Path, *extra: str, verbose: bool = True) -> list[str]:
    return [sys.executable, "-m", "byol_flax.main",
            f"--config={REPO / 'byol_flax' / 'configs' / 'digits_cpu.py'}:{data_dir}",
            f"--workdir={workdir}", *(["--verbose"] if verbose else []), *SHRINK, *extra]


# One persistent compilation cache for this module's subprocesses: resumes and reruns of the
# same program compile nothing.
CACHE_DIR = tempfile.mkdtemp(prefix="byol_driver_jax_cache_")


def env() -> dict[str, str]:
    """One CPU device per subprocess, like a user's machine (the tests' 8 devices are not
    inherited), and the module's compilation cache."""
    return {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3",
            "JAX_COMPILATION_CACHE_DIR": CACHE_DIR,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run(cmd: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run of the real entry point (quiet console, the default), with the kNN
    monitor and the online classifier's evaluation at the end."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run(entry_point(data_dir, workdir, f"--config.monitor.every_steps={TOTAL_STEPS}",
                             "--config.monitor.max_train_examples=200", verbose=False))
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir / "console.txt").write_text(result.stdout + result.stderr)
    return workdir


@pytest.mark.slow  # ~30 s: the command end to end, as a person sees it
def test_console_shows_stages_and_a_progress_bar_and_the_log_file_has_the_rest(reference_run):
    console = (reference_run / "console.txt").read_text()
    lines = [line for line in console.splitlines() if line.strip()]
    assert len(lines) < 15, console
    assert "full log in" in console and "pre-training" in console and "step" in console
    assert "logging_writer" not in console and "orbax" not in console.lower(), console
    log = (reference_run / "log.txt").read_text()
    # Every scalar line, the parameter table and Orbax's messages went to the file instead.
    assert log.count("logging_writer.py") >= TOTAL_STEPS // 4
    assert "online_classifier/loss" in log and "orbax" in log.lower()


@pytest.mark.slow  # ~35 s: the training run the module's other end-to-end tests share
def test_end_to_end_writes_checkpoints_tensorboard_and_metrics(reference_run):
    assert committed_steps(reference_run) == [8, 12, 16]  # max_to_keep = 3, newest kept
    assert list(reference_run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    config = json.loads((reference_run / "config.json").read_text())
    assert config["training"]["batch_size"] == 16 and config["model"]["encoder"]["name"]
    metrics = json.loads((reference_run / "final_metrics.json").read_text())
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["knn/top1_k20"] <= 1.0
    # The official online classifier trained (digits have labels) and was evaluated on holdout.
    assert np.isfinite(metrics["online_classifier/loss"])
    assert 0.0 <= metrics["online_classifier/top1"] <= 1.0
    state = final_state(reference_run)[0]
    assert any(name.startswith("/classifier/") for name in state), sorted(state)[:5]
    assert metrics["collapse/projection_effective_rank"] >= 1.0
    # metrics.jsonl: a line per logging step and one for the monitors; the last step's lines
    # merged are what final_metrics.json records.
    lines = read_metrics(reference_run)
    assert [line["step"] for line in lines] == list(range(4, TOTAL_STEPS + 1, 4))
    assert all(np.isfinite(line["loss"]) and "learning_rate" in line for line in lines)
    assert "knn/top1_k20" in lines[-1] and "knn/top1_k20" not in lines[0]
    assert {k: v for k, v in lines[-1].items() if k != "step"} == metrics


def read_metrics(workdir: Path) -> list[dict]:
    """metrics.jsonl's lines merged by step (scalars, then the monitors' line), in step order."""
    by_step = metrics_by_step(workdir)
    return [by_step[step] for step in sorted(by_step)]


def test_typo_in_a_config_key_is_rejected_by_name(data_dir, tmp_path):
    result = run(entry_point(data_dir, tmp_path / "typo", "--config.training.batchsize=8"))
    assert result.returncode != 0
    assert "batchsize" in result.stderr


@pytest.mark.parametrize("key,value,message", [
    ("training.batch_size", 12, "divisible by the 8 devices"),
    ("training.warmup_epochs", 500.0, "shorter than training.epochs"),
    ("optimizer.base_learning_rate", -0.1, "must be positive"),
    ("model.encoder.name", "resnet51", "must be one of"),
    ("target.schedule", "linear", "'cosine' or 'constant'"),
    ("data.dir", "", "is empty"),
])
def test_inconsistent_values_are_rejected_naming_the_key(key, value, message):
    config = digits_cpu.get_config()
    *parents, name = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[name] = value
    with pytest.raises(ConfigError, match=f"config.{key}=.*{message}"):
        validate_config(config, num_devices=8)


def test_wrong_type_is_rejected():
    config = digits_cpu.get_config()
    with pytest.raises(TypeError):
        config.training.batch_size = "large"


@pytest.mark.slow  # ~25 s: a run that diverges, end to end
def test_non_finite_loss_stops_without_checkpointing_the_bad_state(data_dir, tmp_path):
    workdir = tmp_path / "nan"
    # A relative --workdir, as in the README, resolved against the current directory.
    result = run(entry_point(data_dir, Path("nan"), "--config.optimizer.base_learning_rate=1e30",
                             "--config.checkpoint.every_steps=1"), cwd=tmp_path)
    assert result.returncode != 0
    assert "NonFiniteLossError" in result.stderr and "at step" in result.stderr
    bad_step = int(re.search(r"NonFiniteLossError: .* at step (\d+):", result.stderr)[1])
    assert all(step < bad_step for step in committed_steps(workdir))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(argv: list[str], log: Path, devices: int = 1) -> Run:
    """A subprocess whose stderr is read as it runs (no pipe can fill up)."""
    environment = {**env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return Run(argv, environment, log)


def kill_after(runs: list, workdir: Path, condition, timeout: float = 300) -> None:
    """kill -9 every process of ``runs`` once ``condition()`` holds."""
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and all(r.process.poll() is None for r in runs), \
            runs[0].text[-3000:]
        time.sleep(0.01)
    for r in runs:
        r.process.send_signal(signal.SIGKILL)
        r.finish()


def assert_bitwise_equal(workdir: Path, reference: Path) -> None:
    (got, got_position, got_counters), (expected, position, counters) = (
        final_state(workdir), final_state(reference))
    assert got.keys() == expected.keys()
    assert got_position == position and got_counters == counters
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow  # ~50 s: three resumed runs
def test_resumes_with_other_worker_counts_are_bitwise_equal(reference_run, data_dir, tmp_path):
    """0 -> 2 -> 1 Grain workers across two kill -9s read exactly the batches of the
    uninterrupted run; the runtime changes are recorded in the config history."""
    workdir = tmp_path / "workers"
    first = start(entry_point(data_dir, workdir, "--config.data.worker_count=0"),
                  tmp_path / "0.log")
    kill_after([first], workdir, lambda: committed_steps(workdir)[-1:] >= [EVERY])
    resumed_at = committed_steps(workdir)[-1]
    second = start(entry_point(data_dir, workdir, "--config.data.worker_count=2"),
                   tmp_path / "2.log")
    kill_after([second], workdir, lambda: committed_steps(workdir)[-1] > resumed_at)
    assert f"resuming at step {resumed_at}" in second.text
    result = run(entry_point(data_dir, workdir, "--config.data.worker_count=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step" in result.stderr
    assert_bitwise_equal(workdir, reference_run)
    history = [(h["key"], h["old"], h["new"], h["kind"]) for h in
               (json.loads(line) for line in (workdir / "config_history.jsonl").read_text()
                .splitlines())]
    assert ("data.worker_count", 0, 2, "runtime") in history
    assert ("data.worker_count", 2, 1, "runtime") in history
    # metrics.jsonl across the kills: each logging step once, the windows' averages those of
    # the uninterrupted run (resumes start at checkpoints, which are logging steps here).
    got, expected = read_metrics(workdir), read_metrics(reference_run)
    assert [line["step"] for line in got] == [line["step"] for line in expected]
    for mine, theirs in zip(got, expected):
        assert (mine["loss"], mine["grad_norm"]) == (theirs["loss"], theirs["grad_norm"]), mine


@pytest.mark.slow  # ~35 s: two resumed runs
def test_a_changed_recipe_is_refused_unless_allowed_and_then_recorded(reference_run, data_dir,
                                                                      tmp_path):
    workdir = tmp_path / "changed"
    shutil.copytree(reference_run, workdir)
    written = (workdir / "config.json").read_text()
    result = run(entry_point(data_dir, workdir, "--config.training.epochs=8",
                             "--config.training.batch_size=32", verbose=False))
    assert result.returncode == 1
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ConfigChangeError") and "at step 16" in error
    assert "training.batch_size: 16 -> 32" in error and "training.epochs: 4.0 -> 8.0" in error
    assert "--allow_config_change=training.batch_size,training.epochs" in error
    assert (workdir / "config.json").read_text() == written  # not silently overwritten
    assert committed_steps(workdir) == [8, 12, 16]

    result = run(entry_point(data_dir, workdir, "--config.training.epochs=8",
                             "--allow_config_change=training.epochs", verbose=False))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 16 of 32" in result.stderr
    assert committed_steps(workdir)[-1] == 32
    from byol_flax.checkpointing.config_changes import read_history
    from byol_flax.export import model_card
    assert [(h["step"], h["key"], h["old"], h["new"], h["kind"])
            for h in read_history(workdir) if h["kind"] == "trained"] == [
        (16, "training.epochs", 4.0, 8.0, "trained")]
    card = model_card.read_model_card(model_card.export_with_model_card(
        str(workdir), str(tmp_path / "export")))
    assert ("training.epochs", 4.0, 8.0) in [(h["key"], h["old"], h["new"])
                                              for h in card["config_history"]]
    assert card["pretrain_config"]["training"]["epochs"] == 8.0
    assert "## Config changes during pre-training" in (tmp_path / "export" /
                                                       model_card.CARD_MARKDOWN).read_text()


@pytest.mark.slow  # ~15 s: two runs on one workdir
def test_a_second_run_on_a_live_workdir_stops_at_once(data_dir, tmp_path):
    workdir = tmp_path / "shared"
    first = start(entry_point(data_dir, workdir), tmp_path / "first.log")
    try:
        first.wait_for(lambda: "pre-training in" in first.text)
        result = run(entry_point(data_dir, workdir, verbose=False))
        assert result.returncode == 1
        assert "WorkdirBusyError" in result.stderr and f"process {first.process.pid}" in \
            result.stderr
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.finish()


@pytest.mark.scenario  # ~3 min; benchmarks/reliability.py runs it in its resume-under-change part
def test_two_processes_agree_on_a_damaged_step_and_resume_on_one_process(data_dir, tmp_path):
    """Multi-host on one machine: jax.distributed on localhost, CPU collectives over gloo, each
    process reading its own rows. Killed after two checkpoints; the newest is damaged; both
    processes restore the same older step (process 0's decision); killed again and resumed on
    ONE process with the same 2 devices: bitwise the uninterrupted 1-process 2-device run."""
    reference = tmp_path / "reference_2_devices"
    result = subprocess.run(entry_point(data_dir, reference, verbose=False), cwd=REPO,
                            env={**env(), "XLA_FLAGS":
                                 "--xla_force_host_platform_device_count=2"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = tmp_path / "two_processes"

    def launch(tag: str) -> list:
        port = free_port()
        return [start(entry_point(data_dir, workdir, f"--coordinator_address=localhost:{port}",
                                  "--num_processes=2", f"--process_id={i}"),
                      tmp_path / f"{tag}_{i}.log") for i in range(2)]

    processes = launch("first")
    kill_after(processes, workdir, lambda: len(committed_steps(workdir)) >= 2)
    *older, newest = committed_steps(workdir)
    integrity = workdir / "checkpoints" / str(newest) / "integrity" / "metadata"
    record = json.loads(integrity.read_text())
    key = sorted(record["checksums"])[0]
    record["checksums"][key] = (record["checksums"][key] + 1) % 2**32  # an altered array
    integrity.write_text(json.dumps(record))

    processes = launch("damaged")
    kill_after(processes, workdir, lambda: all("resuming at step" in p.text for p in processes))
    for p in processes:
        assert f"resuming at step {older[-1]}" in p.text, p.text[-2000:]
    assert "2 processes, 2 devices" in (workdir / "log.txt").read_text()
    assert [p.name for p in (workdir / "checkpoints").iterdir()
            if p.name.startswith(f"{newest}.damaged")]

    result = subprocess.run(entry_point(data_dir, workdir, verbose=False), cwd=REPO,
                            env={**env(), "XLA_FLAGS":
                                 "--xla_force_host_platform_device_count=2"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step" in result.stderr
    assert_bitwise_equal(workdir, reference)


def test_runs_differing_only_in_seed_or_host_augmentation_share_the_compiled_step():
    from byol_flax.sharding import make_mesh
    from byol_flax.train import _cached_train_step
    from byol_flax.train_step import StepOptions

    mesh = make_mesh()
    first = digits_cpu.get_config("data=/d,augment=paper")
    other_seed = digits_cpu.get_config("data=/d,augment=paper")
    other_seed.seed = 7
    other_seed.augment.crop_area_min = 0.25  # host-side crops and flips differ
    other_seed.augment.view1.flip_prob = other_seed.augment.view2.flip_prob = 0.0
    other_lr = digits_cpu.get_config("data=/d,augment=paper")
    other_lr.optimizer.base_learning_rate = 0.5

    def step(config, total_steps=100, num_classes=10):
        options = StepOptions.from_config(config, total_steps, 10)
        return _cached_train_step(config, None, mesh, options, total_steps=total_steps,
                                  warmup_steps=10, num_classes=num_classes)

    assert step(first) is step(other_seed)
    assert step(first) is not step(other_lr)
    assert step(first) is not step(first, total_steps=200)
    assert step(first) is not step(first, num_classes=0)
