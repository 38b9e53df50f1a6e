"""The real entry point end to end: checkpoints, TensorBoard, 2-process resume,
config errors and the non-finite-loss stop. Runs experiments/digits_cpu.py, shrunk."""

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from byol_flax.config import ConfigError, validate_config
from data_prep import digits
from experiments import digits_cpu

REPO = Path(__file__).resolve().parents[1]
# Exact-resume checks (kill -9 at random moments, SIGTERM, damaged checkpoints and data, NaN)
# live in benchmarks/reliability.py; tests/test_reliability.py runs its fast subset. Its helpers
# read committed checkpoints here too.
_spec = importlib.util.spec_from_file_location("reliability", REPO / "benchmarks" /
                                               "reliability.py")
reliability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reliability)
committed_steps, final_state = reliability.committed_steps, reliability.final_state
# 64 examples per "epoch" at batch 16: 4 steps per epoch, 16 steps in all.
SHRINK = reliability.shrink_flags(num_train_examples=64, logging_every=4)
TOTAL_STEPS, EVERY = 16, reliability.EVERY


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    assert digits.main(["--out", str(out), "--holdout-count", "100", "--no-progress"]) == 0
    return str(out)


def entry_point(data_dir: str, workdir: Path, *extra: str, verbose: bool = True) -> list[str]:
    return [sys.executable, "-m", "byol_flax.main",
            f"--config={REPO / 'experiments' / 'digits_cpu.py'}:{data_dir}",
            f"--workdir={workdir}", *(["--verbose"] if verbose else []), *SHRINK, *extra]


def env() -> dict[str, str]:
    """One CPU device per subprocess, like a user's machine (the tests' 8 devices are not
    inherited)."""
    return {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


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


@pytest.mark.slow
def test_two_processes_train_get_killed_resume_and_match_one_process(reference_run, data_dir,
                                                                     tmp_path):
    """Multi-host on one machine: jax.distributed on localhost, CPU collectives over gloo, each
    process reading its own rows; killed after a checkpoint, resumed, compared with 1 process."""
    workdir = tmp_path / "two_processes"

    def launch():
        port = free_port()
        # Quiet console (the default): stderr is a pipe read only at the end, and verbose logs
        # would fill it and block the processes.
        return [subprocess.Popen(entry_point(data_dir, workdir, f"--coordinator_address=localhost:{port}",
                                             "--num_processes=2", f"--process_id={i}",
                                             verbose=False),
                                 env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]

    processes = launch()
    deadline = time.time() + 300
    while not committed_steps(workdir) and time.time() < deadline:
        assert all(p.poll() is None for p in processes), processes[0].stderr.read()[-3000:]
        time.sleep(0.05)
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert committed_steps(workdir)[-1] < TOTAL_STEPS
    processes = launch()
    for p in processes:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    assert "resuming at step" in stderr
    assert "2 processes, 2 devices" in (workdir / "log.txt").read_text()
    expected, got = final_state(reference_run)[0], final_state(workdir)[0]
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=2e-3, atol=2e-5, err_msg=name)


def test_runs_differing_only_in_seed_or_host_augmentation_share_the_compiled_step():
    from byol_flax.sharding import make_mesh
    from byol_flax.train import _cached_train_step

    mesh = make_mesh()
    first = digits_cpu.get_config("data=/d,augment=paper")
    other_seed = digits_cpu.get_config("data=/d,augment=paper")
    other_seed.seed = 7
    other_seed.augment.crop_area_min = 0.25  # host-side crops and flips differ
    other_seed.augment.view1.flip_prob = other_seed.augment.view2.flip_prob = 0.0
    other_lr = digits_cpu.get_config("data=/d,augment=paper")
    other_lr.optimizer.base_learning_rate = 0.5
    step = lambda config: _cached_train_step(config, None, mesh, 100, 10, 10)  # noqa: E731
    assert step(first) is step(other_seed)
    assert step(first) is not step(other_lr)
    assert step(first) is not _cached_train_step(first, None, mesh, 200, 10, 10)
    assert step(first) is not _cached_train_step(first, None, mesh, 100, 10, 0)


def test_collapse_warning_names_the_step_for_projections_and_representations(caplog):
    from byol_flax.train import _warn_on_collapse  # noqa: PLC0415

    scalars = {"collapse/projection_std_ratio": 0.05, "collapse/projection_effective_rank": 1.3,
               "collapse/representation_std_ratio": 0.1}
    with caplog.at_level(logging.WARNING):
        _warn_on_collapse(420, scalars, fraction=0.2)
    messages = [r.getMessage() for r in caplog.records]
    assert any("step 420: possible collapse" in m and "projections is 0.050" in m
               and "effective rank 1.3" in m for m in messages)
    assert any("representations is 0.100" in m for m in messages)
    caplog.clear()
    _warn_on_collapse(421, {"collapse/projection_std_ratio": 0.7}, fraction=0.2)
    assert not caplog.records
