"""A whole run on ``gs://`` through the real clients, against a Cloud Storage API server
(tests/gcs_server.py), with only ``STORAGE_EMULATOR_HOST`` set: the installed ``byol-train``
(workdir and data on gs://) stopped by SIGTERM and resumed, ``byol-evaluate`` and
``byol-export`` on gs://; the final state equals a local uninterrupted run bitwise. Then the
same with transient errors and latency on the checkpoint uploads, and a kill -9 in the middle
of a checkpoint upload (the step without its commit marker is never restored; the relaunch
resumes bitwise). The runs are the reliability suite's 20-step digits run
(:mod:`benchmarks.reliability_processes`)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.reliability_processes import (
    TOTAL_STEPS,
    Run,
    entry_point,
    final_state,
    states_equal,
    subprocess_env,
)
from byol_flax.storage import gcs
from tests.gcs_server import GcsServer

BIN = Path(sys.executable).parent
BUCKET = "bucket"
# A checkpoint's array uploads (TensorStore: simple uploads whose name is in the query).
CHECKPOINT_UPLOAD = r"^/upload/storage/v1/b/bucket/o\?.*checkpoints(%2F|/)"


def only_the_emulator_variable(base: dict[str, str], server: GcsServer) -> dict[str, str]:
    """``base`` without any setting the storage layer derives, plus STORAGE_EMULATOR_HOST."""
    derived = gcs.derived_settings("http://x")
    return {**{k: v for k, v in base.items() if k not in derived},
            gcs.EMULATOR_VARIABLE: server.emulator_host}


@pytest.fixture(scope="module")
def server():
    with GcsServer() as started:
        yield started


@pytest.fixture(scope="module")
def bucket(server):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    previous = os.environ.get(gcs.EMULATOR_VARIABLE)
    os.environ[gcs.EMULATOR_VARIABLE] = server.emulator_host
    try:
        yield storage.Client(project="test", credentials=AnonymousCredentials()).bucket(BUCKET)
    finally:
        if previous is None:
            os.environ.pop(gcs.EMULATOR_VARIABLE)
        else:
            os.environ[gcs.EMULATOR_VARIABLE] = previous


@pytest.fixture(scope="module")
def setting(server, bucket, data_dir, tmp_path_factory):
    """The digits uploaded to gs://bucket/digits, the environment, and the local reference."""
    root = tmp_path_factory.mktemp("gcs_workdir")
    for name in os.listdir(data_dir):
        bucket.blob(f"digits/{name}").upload_from_filename(os.path.join(data_dir, name))
    env = only_the_emulator_variable(subprocess_env(root / "jax_cache"), server)
    reference = Run(entry_point(data_dir, root / "reference"), env, root / "reference.log")
    assert reference.finish() == 0, reference.text[-3000:]
    return {"root": root, "env": env, "reference": final_state(root / "reference")}


def train(setting: dict, workdir: str, name: str) -> Run:
    """The installed byol-train on gs:// data into ``workdir`` (gs://), started."""
    root = setting["root"]
    return Run(entry_point(f"gs://{BUCKET}/digits", workdir,
                           f"--config.data.local_cache_dir={root / 'cache'}",
                           program=[str(BIN / "byol-train")]),
               setting["env"], root / f"{name}.log")


def objects(bucket, prefix: str) -> dict[str, int]:
    return {blob.name[len(prefix):]: blob.size for blob in bucket.list_blobs(prefix=prefix)}


def download_checkpoint(bucket, prefix: str, local: Path) -> Path:
    """The newest committed step of gs://bucket/<prefix>, downloaded for the Orbax reader."""
    steps = sorted(int(m[1]) for name in objects(bucket, f"{prefix}/checkpoints/")
                   if (m := re.fullmatch(r"(\d+)/commit_success\.txt", name)))
    for blob in bucket.list_blobs(prefix=f"{prefix}/checkpoints/{steps[-1]}/"):
        target = local / blob.name[len(prefix) + 1:]
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(target)
    return local


def read_back(setting: dict, workdir: str) -> dict:
    """metrics.jsonl through the storage layer and the scalars TensorBoard's own reader finds,
    read from gs:// by a process with only STORAGE_EMULATOR_HOST set."""
    code = (
        "import json, sys\n"
        "from byol_flax.train_logging import read_metrics\n"
        "from tensorboard.backend.event_processing import event_accumulator as ea\n"
        "steps = [json.loads(line)['step'] for line in read_metrics(sys.argv[1]).splitlines()]\n"
        "events = ea.EventAccumulator(sys.argv[1], size_guidance={'tensors': 0})\n"
        "events.Reload()\n"
        "print(json.dumps({'metrics_steps': steps,\n"
        "                  'loss_steps': [e.step for e in events.Tensors('loss')]}))\n")
    done = subprocess.run([sys.executable, "-c", code, workdir], env=setting["env"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~90 s: a reference run, a stopped and resumed run, evaluation and export
def test_train_stop_resume_evaluate_export_on_gs_equals_a_local_run(setting, server, bucket,
                                                                    tmp_path):
    workdir = f"gs://{BUCKET}/run"
    first = train(setting, workdir, "stopped")
    first.wait_for(lambda: first.last_step >= 6)
    first.process.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.text[-3000:]
    assert first.last_step < TOTAL_STEPS
    second = train(setting, workdir, "resumed")
    assert second.finish() == 0, second.text[-3000:]
    assert 0 < second.resumed_from < TOTAL_STEPS
    assert states_equal(final_state(download_checkpoint(bucket, "run", tmp_path)),
                        setting["reference"])

    written = objects(bucket, "run/")
    for name in ("config.json", "config_history.jsonl", "final_metrics.json",
                 f"checkpoints/{TOTAL_STEPS}/commit_success.txt", ".byol_flax_output.json"):
        assert name in written, sorted(written)
    for log in ("log.txt", "metrics.jsonl", "events.out.tfevents"):
        assert any(name.startswith(log + ".") for name in written), (log, sorted(written))
    assert "lease.json" not in written  # released by the finished run
    history = read_back(setting, workdir)
    assert history["metrics_steps"] == list(range(1, TOTAL_STEPS + 1))
    assert set(history["loss_steps"]) == set(range(1, TOTAL_STEPS + 1))

    evaluate = subprocess.run(
        [str(BIN / "byol-evaluate"), f"--config=eval_digits:knn,data=gs://{BUCKET}/digits,"
         "smoke=True", f"--config.data.local_cache_dir={tmp_path / 'eval_cache'}",
         f"--source={workdir}", f"--workdir=gs://{BUCKET}/eval"],
        env=setting["env"], capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads(evaluate.stdout.strip().splitlines()[-1])
    assert result["protocol"] == "knn" and 0.0 <= result["test"]["top1_k20"] <= 1.0
    results = json.loads(bucket.blob("eval/results.json").download_as_bytes())
    assert results["test"] == result["test"]

    export = subprocess.run(
        [str(BIN / "byol-export"), f"--workdir={workdir}", f"--out=gs://{BUCKET}/export"],
        env=setting["env"], capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    exported = objects(bucket, "export/")
    for name in ("encoder_config.json", "model_card.json", "MODEL_CARD.md",
                 "encoder/commit_success.txt"):
        assert name in exported, sorted(exported)
    assert not objects(bucket, ".export")  # the staging directory is gone


@pytest.mark.slow  # ~40 s: one run whose checkpoint uploads meet 503s, 429s and latency
def test_transient_errors_on_checkpoint_uploads_are_retried_to_the_same_state(
        setting, server, bucket, tmp_path):
    faults = [server.inject(503, count=6, probability=0.5, method="POST",
                            path_regex=CHECKPOINT_UPLOAD),
              server.inject(429, count=3, probability=0.3, method="POST",
                            path_regex=CHECKPOINT_UPLOAD),
              server.inject(latency=0.2, count=20, method="POST", path_regex=CHECKPOINT_UPLOAD)]
    try:
        run = train(setting, f"gs://{BUCKET}/faults", "faults")
        assert run.finish() == 0, run.text[-3000:]
    finally:
        server.clear_faults()
    assert all(fault.fired for fault in faults), [fault.describe() for fault in faults]
    assert states_equal(final_state(download_checkpoint(bucket, "faults", tmp_path)),
                        setting["reference"])


@pytest.mark.slow  # ~50 s: a run killed while a checkpoint uploads, and its relaunch
def test_a_kill_during_a_checkpoint_upload_keeps_the_previous_one_and_resumes_bitwise(
        setting, server, bucket, tmp_path):
    step_8 = CHECKPOINT_UPLOAD + r"8(%2F|/)"
    # The first uploads of step 8 land, the next ones hang: the kill finds it half written.
    slow = server.inject(latency=5.0, method="POST", path_regex=step_8, after=3)
    try:
        killed = train(setting, f"gs://{BUCKET}/killed", "killed")
        killed.wait_for(lambda: slow.fired >= 1, timeout=300)
        killed.process.send_signal(signal.SIGKILL)
        killed.finish()
    finally:
        server.clear_faults()
    written = objects(bucket, "killed/checkpoints/")
    assert "4/commit_success.txt" in written
    assert any(name.startswith("8/") for name in written), sorted(written)  # partly uploaded
    assert "8/commit_success.txt" not in written

    relaunch = train(setting, f"gs://{BUCKET}/killed", "relaunch")
    assert relaunch.finish() == 0, relaunch.text[-3000:]
    assert relaunch.resumed_from == 4
    assert states_equal(final_state(download_checkpoint(bucket, "killed", tmp_path)),
                        setting["reference"])
