"""The Cloud TPU launcher in dry-run mode, slice arithmetic and the remote data route."""

import shlex
from pathlib import Path

import pytest

from byol_flax.cloud import launch
from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice, plan_batch
from byol_flax.data import records

REPO = Path(__file__).resolve().parents[1]


def dry_run(capsys, *argv):
    assert launch.main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


SINGLE_HOST = ["up", "--tpu", "byol-v4-8", "--zone", "us-central2-b", "--accelerator-type",
               "v4-8", "--config", "byol_flax/configs/byol_imagenet.py:r50x1,slice=v4-8",
               "--workdir", "gs://my-bucket/byol_r50x1",
               "--override=--config.data.dir=gs://my-bucket/imagenet_arrayrecord", "--spot"]


def test_single_host_commands(capsys):
    lines = dry_run(capsys, *SINGLE_HOST)
    assert lines == [
        'gcloud compute tpus tpu-vm create byol-v4-8 --zone=us-central2-b --accelerator-type=v4-8 '
        '--version=tpu-ubuntu2204-base --spot',
        'gcloud compute tpus tpu-vm ssh byol-v4-8 --zone=us-central2-b --worker=all '
        '\'--command=sudo apt-get update -q && sudo apt-get install -y -q python3.11 '
        'python3.11-venv && python3.11 -m venv ~/byol_venv && (git clone --depth 1 '
        'https://github.com/byol-flax/byol_flax.git ~/byol_flax || git -C ~/byol_flax pull) && '
        '~/byol_venv/bin/pip install -c ~/byol_flax/constraints.txt "jax[tpu]" -e ~/byol_flax\'',
        "gcloud compute tpus tpu-vm ssh byol-v4-8 --zone=us-central2-b --worker=all '--command=cd "
        "~/byol_flax && nohup ~/byol_venv/bin/python -m byol_flax.main "
        "--config=byol_flax/configs/byol_imagenet.py:r50x1,slice=v4-8 "
        "--workdir=gs://my-bucket/byol_r50x1 "
        "--config.data.dir=gs://my-bucket/imagenet_arrayrecord < /dev/null > ~/byol_train.log "
        "2>&1 &'",
    ]


def test_the_install_step_pins_the_tested_releases():
    """The launcher installs with the repository's constraints.txt, which pins jax (and so the
    jax[tpu] it installs) to the tested release."""
    install = launch.Launch("t", "z", "v4-8", "c", "gs://b/w").install()[0][-1]
    assert f"-c {launch.CONSTRAINTS} " in install and "-U" not in install.split()
    constraints = REPO / launch.CONSTRAINTS.removeprefix(launch.CHECKOUT + "/")
    pins = dict(line.split("==") for line in constraints.read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["jax"] == pins["jaxlib"]


def test_multi_host_spot_relaunch_and_logs(capsys):
    common = ["--tpu", "byol-v4-64", "--zone", "us-central2-b", "--accelerator-type", "v4-64",
              "--config", "byol_flax/configs/byol_imagenet.py:r50x1,slice=v4-64", "--workdir",
              "gs://my-bucket/byol_r50x1", "--project", "my-project", "--spot"]
    lines = dry_run(capsys, "relaunch", *common)
    assert lines[0] == ("gcloud compute tpus tpu-vm delete byol-v4-64 --zone=us-central2-b "
                        "--project=my-project --quiet")
    assert lines[1].endswith("--accelerator-type=v4-64 --version=tpu-ubuntu2204-base --spot")
    assert all("--worker=all" in line for line in lines[2:])  # same command on every worker
    assert len(lines) == 4
    train = shlex.split(lines[3])
    assert "--workdir=gs://my-bucket/byol_r50x1" in train[-1]  # the same workdir: it resumes
    assert "--distributed" in train[-1]  # 8 workers: jax.distributed joins them
    logs = dry_run(capsys, "logs", *common)
    assert logs == ["gcloud compute tpus tpu-vm ssh byol-v4-64 --zone=us-central2-b "
                    "--project=my-project --worker=0 '--command=tail -f ~/byol_train.log'"]


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
    copied = records.copy_dataset(source, cache / "imagenet")
    records.verify_split(copied, records.load_manifest(copied), "train")
    mtime = (copied / shard.file).stat().mtime
    records.copy_dataset(source, cache / "imagenet")  # a restart does not copy again
    assert (copied / shard.file).stat().mtime == mtime


def test_data_dir_schemes():
    assert records.resolve_data_dir("/mnt/gcs/imagenet", "/tmp/cache") == "/mnt/gcs/imagenet"
    with pytest.raises(records.DataError, match="s3:// scheme is not supported"):
        records.resolve_data_dir("s3://bucket/imagenet", "/tmp/cache")
    with pytest.raises(records.DataError, match="set config.data.local_cache_dir"):
        records.resolve_data_dir("gs://bucket/imagenet", "")


def test_flag_errors_are_one_line_with_status_2(capsys):
    """absl flags of the launcher's own (byol_flax.runtime.console.run_command): the action stays
    a positional argument; an unknown action or accelerator type, a missing flag or both
    capacity flags are refused before anything is printed or run."""
    slice_flags = ["--tpu=t", "--zone=z", "--config=digits_cpu", "--workdir=gs://b/run"]
    for argv, named in ((["explode", "--accelerator-type=v4-8", *slice_flags], "explode"),
                        (["up", "--accelerator-type=v9-8", *slice_flags], "v9-8"),
                        (["--accelerator-type=v4-8", *slice_flags], "one action"),
                        (["up", "--tpu=t"], "--zone"),
                        (["up", "--accelerator-type=v4-8", "--spot", "--preemptible",
                          *slice_flags], "preemptible")):
        assert launch.main(argv) == 2
        out, err = capsys.readouterr()
        assert not out and err.startswith("error: ") and named in err and err.count("\n") == 1
