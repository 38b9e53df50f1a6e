"""Multi-process start-up (byol_flax.runtime.distributed): which environments are joined without
flags, as JAX's own cluster detectors see them, and two CPU processes started the way SLURM's
``srun`` starts them agreeing on the process count and a cross-process sum."""

import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from jax._src import clusters, xla_bridge
from jax._src.clusters import cloud_tpu_cluster

from byol_flax.runtime import distributed
from tests.test_train_driver import data_dir  # noqa: F401 (a fixture: the digits, converted)

REPO = Path(__file__).resolve().parents[1]
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "KUBERNETES_")


def test_the_private_jax_detectors_are_where_they_were():
    """jax._src.clusters is private: if a JAX release moves it, this names what moved (the
    entry point would otherwise stop joining clusters it used to join)."""
    classes = {env.__name__: env for env in clusters.ClusterEnv._cluster_types}
    assert set(distributed.AUTO_DETECTED) <= set(classes), sorted(classes)
    for name in distributed.AUTO_DETECTED:
        for method in ("is_env_present", "get_process_count", "get_process_id"):
            assert callable(getattr(classes[name], method, None)), f"{name}.{method}"
        assert classes[name].name and not classes[name].opt_in_only_method, name
    assert hasattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm")
    assert callable(cloud_tpu_cluster.get_metadata)


@pytest.fixture
def no_cluster(monkeypatch):
    """This process as on a laptop: no cluster variables, not a Cloud TPU VM."""
    for key in list(os.environ):
        if key.startswith(CLUSTER_PREFIXES):
            monkeypatch.delenv(key)
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    return monkeypatch


def slurm(monkeypatch, tasks: int, rank: int = 0, job: int = 1234) -> None:
    for key, value in {"SLURM_JOB_ID": job, "SLURM_STEP_NODELIST": "localhost",
                       "SLURM_NTASKS": tasks, "SLURM_PROCID": rank,
                       "SLURM_LOCALID": rank}.items():
        monkeypatch.setenv(key, str(value))


def test_one_process_joins_nothing_unless_forced(no_cluster):
    assert distributed.plan(None, None, None, force=False) is None
    assert distributed.plan(None, None, None, force=True) == ("--distributed", {})
    slurm(no_cluster, tasks=1)  # srun -n 1
    assert distributed.plan(None, None, None, force=False) is None
    assert distributed.plan(None, None, None, force=True) == ("SLURM", {})


def test_slurm_with_several_tasks_and_explicit_flags(no_cluster):
    slurm(no_cluster, tasks=2)
    assert distributed.plan(None, None, None, force=False) == (
        "SLURM", {"cluster_detection_method": "slurm"})
    assert distributed.plan("h:1", 2, 1, force=False) == (
        "--coordinator_address",
        {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1})


def test_cloud_tpu_slices_are_joined_and_single_hosts_are_not(no_cluster):
    no_cluster.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    endpoints = {"one": "w:0:10.0.0.1", "two": "w:0:10.0.0.1,w:1:10.0.0.2"}
    metadata = {"agent-worker-number": "0", "tpu-env": "ACCELERATOR_TYPE: 'v4-8'"}
    for hosts, expected in (("one", None),
                            ("two", ("Cloud TPU VM", {"cluster_detection_method": "gcetpu"}))):
        metadata["worker-network-endpoints"] = endpoints[hosts]
        no_cluster.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))
        assert distributed.plan(None, None, None, force=False) == expected, hosts
    # GKE: no TPU VM metadata (JAX asks for it first); the worker list is in the environment.
    no_cluster.setattr(cloud_tpu_cluster, "get_metadata", lambda key: ("not found", 404))
    no_cluster.setenv("MEGASCALE_NUM_SLICES", "1")
    no_cluster.setenv("TPU_WORKER_ID", "0")
    no_cluster.setenv("TPU_WORKER_HOSTNAMES", "host-0")
    assert distributed.plan(None, None, None, force=False) is None
    no_cluster.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert distributed.plan(None, None, None, force=False) == (
        "Cloud TPU (GKE)", {"cluster_detection_method": "gketpu"})


def test_an_unreadable_tpu_metadata_server_is_a_warning_and_one_process(no_cluster, caplog):
    no_cluster.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)

    def unreachable(key):
        raise OSError("metadata.google.internal: connection refused")

    no_cluster.setattr(cloud_tpu_cluster, "get_metadata", unreachable)
    assert distributed.plan(None, None, None, force=False) is None
    assert any("Cloud TPU VM detected but its process count cannot be read" in r.getMessage()
               for r in caplog.records)


CHILD = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from byol_flax.runtime import distributed
    distributed.initialize()
    total = multihost_utils.process_allgather(np.int32(jax.process_index() + 1)).sum()
    print(f"RESULT {jax.process_count()} {jax.process_index()} {total}", flush=True)
""")


def child_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(CLUSTER_PREFIXES)}
    return {**env, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": str(REPO), **extra}


def free_slurm_port() -> int:
    """A free port in the range JAX derives SLURM's coordinator port from (the job id)."""
    for _ in range(100):
        port = random.randint(65535 - 2**12 + 1, 65535)
        with socket.socket() as probe:
            try:
                probe.bind(("localhost", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in JAX's SLURM range")


def slurm_env(rank: int, port: int) -> dict[str, str]:
    job = 7 * 2**12 + port - (65535 - 2**12 + 1)  # JAX: port = job % 4096 + 61440
    return child_env(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="localhost",
                     SLURM_NODELIST="localhost", SLURM_STEP_NUM_NODES="1", SLURM_NTASKS="2",
                     SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))


def test_two_slurm_processes_join_and_sum_across_processes():
    """srun -n 2 on one node, as environment variables: no flags, each process its own."""
    port = free_slurm_port()
    processes = [subprocess.Popen([sys.executable, "-c", CHILD], env=slurm_env(rank, port),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for rank in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=120))
    finally:
        for process in processes:
            process.kill()
    for rank, (process, (out, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, err[-3000:]
        assert f"RESULT 2 {rank} 3" in out, out
        assert f"multi-process: SLURM, 2 processes, this is {rank}" in err


def test_forcing_a_join_where_there_is_no_cluster_is_one_line_saying_what_to_do(no_cluster):
    """JAX's own initialize() finds nothing to join; the error says what to do instead. (This
    process's devices are in use already, which JAX checks first: that check is bypassed; the
    detection fails before anything is started.)"""
    no_cluster.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    with pytest.raises(distributed.DistributedError,
                       match="--distributed: no cluster environment found.*--coordinator_address, "
                             "--num_processes and --process_id"):
        distributed.initialize(force=True)
    assert not jax.distributed.is_initialized()


@pytest.mark.scenario  # ~2 min on 2 cores: two processes each compile the step
def test_byol_train_under_srun_with_two_tasks_trains_to_the_end(data_dir, tmp_path):
    """The real entry point, two processes started as ``srun -n 2`` starts them, no flags."""
    from tests.test_train_driver import TOTAL_STEPS, entry_point
    from tests.test_train_driver import env as driver_env

    workdir, port = tmp_path / "slurm", free_slurm_port()
    # stderr to files: a pipe read only after the other process ends fills up and stalls a
    # verbose process, and with it the collective the other one waits in.
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    processes = [subprocess.Popen(entry_point(data_dir, workdir),
                                  env={**driver_env(), **{k: v for k, v in slurm_env(rank, port)
                                                          .items() if k.startswith("SLURM_")}},
                                  cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=logs[rank].open("w")) for rank in range(2)]
    for process in processes:
        process.wait(timeout=600)
    errors = [log.read_text() for log in logs]
    for rank, (process, err) in enumerate(zip(processes, errors)):
        assert process.returncode == 0, err[-3000:]
        assert f"multi-process: SLURM, 2 processes, this is {rank}" in err
    assert (workdir / "checkpoints" / str(TOTAL_STEPS)).is_dir()
