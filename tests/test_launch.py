"""The task definitions of byol-launch (SkyPilot managed jobs, xpk workloads) and their
validation by the engines' own parsers, slice arithmetic and the remote data route."""

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from byol_flax.cloud import launch, tasks
from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice, plan_batch
from byol_flax.data import records, staging
from byol_flax.runtime import code_identity

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
URL = "https://github.com/OWNER/byol_flax.git"
# xpk 1.16 pins tabulate 0.9 (constraints.txt has 0.10), so it lives in its own environment:
#   python3 -m venv ~/.cache/byol_flax/xpk-1.16.0
#   ~/.cache/byol_flax/xpk-1.16.0/bin/pip install xpk==1.16.0
XPK_PYTHON = Path(os.environ.get("BYOL_XPK_PYTHON", Path.home() / ".cache" / "byol_flax" /
                                 "xpk-1.16.0" / "bin" / "python"))


def generate(capsys, *argv: str) -> str:
    assert launch.main(list(argv)) == 0
    return capsys.readouterr().out


def sky_task(capsys, *argv: str) -> dict:
    return yaml.safe_load(generate(capsys, "skypilot", f"--repo={URL}", f"--commit={COMMIT}",
                                   "--workdir=gs://b/run", *argv))


def test_skypilot_tpu_slice_is_a_spot_managed_job_at_the_pinned_commit(capsys):
    task = sky_task(capsys, "--config=byol_imagenet:r50x1,slice=v4-64", "--accelerator=tpu-v4-64",
                    "--override=--config.data.dir=gs://b/imagenet")
    assert task["resources"] == {
        "cloud": "gcp", "accelerators": "tpu-v4-64",
        "accelerator_args": {"runtime_version": "tpu-ubuntu2204-base"}, "use_spot": True,
        "job_recovery": {"strategy": "FAILOVER", "max_restarts_on_errors": 3}}
    assert task["num_nodes"] == 1  # the slice's 8 hosts all run `run`
    assert task["workdir"] == {"url": URL, "ref": COMMIT}  # SkyPilot clones it at the commit
    assert task["setup"].splitlines()[-1] == (
        '~/byol_venv/bin/pip install -c constraints.txt "jax[tpu]" .')
    assert task["run"].splitlines()[-1] == (
        "byol-train --config=byol_imagenet:r50x1,slice=v4-64 --workdir=gs://b/run --distributed "
        "--config.data.dir=gs://b/imagenet")
    single_host = sky_task(capsys, "--config=c", "--accelerator=v4-8", "--nospot")
    assert single_host["resources"]["use_spot"] is False
    assert single_host["run"].splitlines()[-1] == "byol-train --config=c --workdir=gs://b/run"


def test_skypilot_gpu_nodes_join_through_skypilot_variables(capsys):
    task = sky_task(capsys, "--config=byol_imagenet:r50x1", "--accelerator=H100:8",
                    "--num_nodes=2", "--recovery_strategy=EAGER_NEXT_REGION",
                    "--max_restarts_on_errors=0", "--cloud=", "--region=us-east1")
    assert task["num_nodes"] == 2
    assert task["resources"] == {"region": "us-east1", "accelerators": "H100:8",
                                 "use_spot": True, "job_recovery": {
                                     "strategy": "EAGER_NEXT_REGION",
                                     "max_restarts_on_errors": 0}}
    assert '-c constraints.txt ".[cuda]"' in task["setup"]
    script = task["run"]
    assert 'COORDINATOR="$(echo "$SKYPILOT_NODE_IPS" | head -n1):8476"' in script
    assert script.splitlines()[-1] == (
        "byol-train --config=byol_imagenet:r50x1 --workdir=gs://b/run "
        '--coordinator_address="$COORDINATOR" --num_processes="$SKYPILOT_NUM_NODES" '
        '--process_id="$SKYPILOT_NODE_RANK"')
    one_node = sky_task(capsys, "--config=c", "--accelerator=A100:8")
    assert "SKYPILOT" not in one_node["run"]  # one process drives the node's GPUs


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], check=True, text=True,
                          capture_output=True).stdout.strip()


def test_the_commit_defaults_to_the_clean_checkout_and_a_dirty_one_is_refused(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = git(tmp_path, "rev-parse", "HEAD")
    assert tasks.pinned_commit(code_identity.git_identity(tmp_path)) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    with pytest.raises(tasks.TaskError, match="uncommitted changes.*--commit=SHA"):
        tasks.pinned_commit(code_identity.git_identity(tmp_path))
    with pytest.raises(tasks.TaskError, match="unknown.*--commit=SHA"):
        tasks.pinned_commit({"commit": None, "dirty": None})


def test_without_commit_the_running_code_is_pinned(capsys, monkeypatch):
    monkeypatch.setattr(code_identity, "code_identity",
                        lambda: {"commit": "f" * 40, "dirty": False})
    task = yaml.safe_load(generate(capsys, "skypilot", "--config=c", "--workdir=gs://b/r",
                                   "--accelerator=v4-8", f"--repo={URL}"))
    assert task["workdir"]["ref"] == "f" * 40
    monkeypatch.setattr(code_identity, "code_identity",
                        lambda: {"commit": "f" * 40, "dirty": True})
    assert launch.main(["skypilot", "--config=c", "--workdir=gs://b/r", "--accelerator=v4-8",
                        f"--repo={URL}"]) == 1
    out, err = capsys.readouterr()
    assert not out and "uncommitted changes" in err and err.count("\n") == 1


def test_xpk_workload_runs_the_training_command_with_restarts(capsys):
    common = ["xpk", "--config=byol_imagenet:r50x1,slice=v5p-256", "--workdir=gs://b/run",
              "--accelerator=tpu-v5p-256", "--cluster=big", "--num_slices=2"]
    lines = generate(capsys, *common, "--docker_image=gcr.io/p/byol:abc").splitlines()
    assert lines[0].startswith("# Generated by: byol-launch xpk ")
    assert shlex.split(lines[1]) == [
        "xpk", "workload", "create", "--cluster=big", "--workload=byol", "--tpu-type=v5p-256",
        "--num-slices=2", "--max-restarts=10", "--docker-image=gcr.io/p/byol:abc",
        "--command=byol-train --config=byol_imagenet:r50x1,slice=v5p-256 "
        "--workdir=gs://b/run --distributed"]
    base = shlex.split(generate(capsys, *common, "--project=p", "--zone=z").splitlines()[1])
    assert base[8:] == ["--project=p", "--zone=z", "--base-docker-image=python:3.11",
                        "--script-dir=.", '--command=pip install -c constraints.txt "jax[tpu]" . '
                        "&& byol-train --config=byol_imagenet:r50x1,slice=v5p-256 "
                        "--workdir=gs://b/run --distributed"]


def test_flag_errors_are_one_line(capsys):
    """An unknown engine or accelerator, a missing or foreign flag, a local workdir, a TPU over
    several nodes or a GPU on xpk is refused before anything is printed."""
    sky = ["--config=c", "--workdir=gs://b/r", f"--repo={URL}", f"--commit={COMMIT}"]
    xpk = ["xpk", "--config=c", "--workdir=gs://b/r", "--cluster=k"]
    for argv, status, named in (
            (["gcloud", "--accelerator=v4-8", *sky], 2, "gcloud"),
            (["skypilot", "--accelerator=v4-8", "--config=c", "--workdir=gs://b/r"], 2, "--repo"),
            (["skypilot", "--accelerator=v4-8", "--cluster=k", *sky], 2, "--cluster"),
            (["skypilot", "--accelerator=v9-8", *sky], 1, "v9-8"),
            (["skypilot", "--accelerator=H100:0", *sky], 1, "H100:0"),
            (["skypilot", "--accelerator=v4-8", "--workdir=/tmp/r", *sky[:1], *sky[2:]], 1,
             "--workdir=/tmp/r"),
            (["skypilot", "--accelerator=v4-64", "--num_nodes=2", *sky], 1, "--num_nodes=2"),
            (["skypilot", "--accelerator=v4-8", "--name=BYOL", *sky], 1, "--name=BYOL"),
            (["skypilot", "--accelerator=v4-8", "--recovery_strategy=NONE", *sky], 2,
             "recovery_strategy"),
            ([*xpk, "--accelerator=H100:8"], 1, "H100:8"),
            ([*xpk[:-1], "--accelerator=v4-8"], 2, "--cluster")):
        assert launch.main(argv) == status, argv
        out, err = capsys.readouterr()
        assert not out and err.startswith("error: ") and named in err and err.count("\n") == 1


def shipped() -> list[Path]:
    return sorted(DEPLOY.glob("*.sky.yaml")) + sorted(DEPLOY.glob("*.xpk.sh"))


@pytest.mark.parametrize("path", shipped(), ids=lambda p: p.name)
def test_shipped_definitions_are_what_the_generator_prints(path):
    """Each file names the command that wrote it on its first line; it must still print it."""
    first = path.read_text().splitlines()[0]
    argv = shlex.split(first.removeprefix("# Generated by: "))
    assert argv[0] == "byol-launch"
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(io.StringIO()):
        assert launch.main(argv[1:]) == 0
    assert output.getvalue() == path.read_text(), f"regenerate: {first[2:]} > {path}"


SKY_CHECK = """
import json, sys
import sky
from sky.jobs import recovery_strategy  # registers the strategies
from sky.utils import registry
results = {}
for path in sys.argv[1:]:
    resources = list(sky.Task.from_yaml(path).resources)[0]
    strategy = registry.JOBS_RECOVERY_STRATEGY_REGISTRY.from_str(
        resources.job_recovery["strategy"])
    results[path] = [str(resources.accelerators), strategy.__name__]
try:
    sky.Task.from_yaml_str(open(sys.argv[1]).read().replace("use_spot", "use_spott"))
except Exception as error:
    results["misspelled"] = type(error).__name__
print(json.dumps(results))
"""


def test_skypilot_parses_the_shipped_tasks(tmp_path):
    """SkyPilot's own schema and Resources check each task offline (in a child process with its
    own HOME: importing sky writes ~/.sky); a misspelled key is refused by the same check."""
    pytest.importorskip("sky")
    paths = [str(p) for p in sorted(DEPLOY.glob("*.sky.yaml"))]
    env = {**os.environ, "HOME": str(tmp_path), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    result = subprocess.run([sys.executable, "-c", SKY_CHECK, *paths], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    checked = json.loads(result.stdout.strip().splitlines()[-1])
    assert checked.pop("misspelled") == "InvalidSkyPilotConfigError"
    assert {Path(p).name: v for p, v in checked.items()} == {
        "byol_imagenet_8xH100_2nodes.sky.yaml": ["{'H100': 8}", "FailoverStrategyExecutor"],
        "byol_imagenet_tpu_v4_64.sky.yaml": ["{'tpu-v4-64': 1}", "FailoverStrategyExecutor"]}


XPK_CHECK = """
import argparse, json, shlex, sys
from xpk.parser.core import set_parser
parser = argparse.ArgumentParser(prog="xpk")
set_parser(parser)
results = []
for path in sys.argv[1:]:
    argv = shlex.split(open(path).read().splitlines()[1])
    args = parser.parse_args(argv[1:])
    results.append([args.func.__name__, args.tpu_type, args.num_slices, args.max_restarts,
                    args.command])
print(json.dumps(results))
"""


@pytest.mark.skipif(not XPK_PYTHON.exists(), reason=f"no xpk environment at {XPK_PYTHON}")
def test_xpk_parses_the_shipped_workloads(tmp_path):
    """xpk's own argparse parser of ``workload create`` (xpk.parser.core) takes each command."""
    paths = [str(p) for p in sorted(DEPLOY.glob("*.xpk.sh"))]
    assert paths
    result = subprocess.run([str(XPK_PYTHON), "-c", XPK_CHECK, *paths], capture_output=True,
                            text=True, env={**os.environ, "HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name, tpu_type, slices, restarts, command in json.loads(result.stdout):
        assert (name, tpu_type, slices, restarts) == ("workload_create", "v5p-256", 2, "10")
        assert command.startswith("byol-train --config=byol_imagenet:r50x1,slice=v5p-256 ")


@pytest.mark.parametrize("accelerator,devices,hosts", [
    ("v3-8", 8, 1), ("v3-512", 512, 64), ("v4-8", 4, 1), ("v4-64", 32, 8),
    ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4), ("v5p-8", 4, 1),
])
def test_slice_arithmetic(accelerator, devices, hosts):
    assert devices_in_slice(accelerator) == devices
    assert hosts_in_slice(accelerator) == hosts


def test_unknown_accelerator_and_batch_plans(caplog):
    with pytest.raises(ValueError, match="unknown TPU accelerator type 'tpu-8'"):
        devices_in_slice("tpu-8")
    plan = plan_batch(4096, 8, 128)
    assert (plan.accumulation_steps, plan.micro_batch, plan.per_device_batch) == (4, 1024, 128)
    with caplog.at_level("WARNING"):
        small = plan_batch(1024, 8, 16)  # micro-batch 128 < 256
    assert small.micro_batch == 128 and "Table 16" in caplog.text
    with pytest.raises(ValueError, match="cannot be split evenly"):
        plan_batch(100, 8, 128)


def test_remote_data_is_copied_to_local_disk(tmp_path):
    source = tmp_path / "bucket" / "imagenet"
    source.mkdir(parents=True)
    shard = records.write_shard(source / records.shard_name("train", 0, 1),
                                [records.Record(b"x", 0, "a"), records.Record(b"y", 1, "b")])
    records.write_manifest(source, records.Manifest(
        "d", ("0", "1"), {"train": records.SplitInfo(2, (shard,))}))
    cache = tmp_path / "cache"
    copied = staging.copy_dataset(source, cache / "imagenet")
    records.verify_split(copied, records.load_manifest(copied), "train")
    mtime = (copied / shard.file).stat().mtime
    staging.copy_dataset(source, cache / "imagenet")  # a restart does not copy again
    assert (copied / shard.file).stat().mtime == mtime


def test_data_dir_schemes():
    assert staging.resolve_data_dir("/mnt/gcs/imagenet", "/tmp/cache") == "/mnt/gcs/imagenet"
    with pytest.raises(records.DataError, match="s3:// scheme is not supported"):
        staging.resolve_data_dir("s3://bucket/imagenet", "/tmp/cache")
    with pytest.raises(records.DataError, match="set config.data.local_cache_dir"):
        staging.resolve_data_dir("gs://bucket/imagenet", "")


