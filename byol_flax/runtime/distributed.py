"""Joining the other processes of a multi-process run, decided the way JAX itself detects clusters.

``jax.distributed.initialize()`` with no arguments reads its coordinator, process count and
process index from the first cluster environment it recognises (``jax._src.clusters``, in its
order: Open MPI, SLURM, Cloud TPU on GKE, Cloud TPU VM, Kubernetes). Calling it where there is
no cluster fails, and calling it on a cluster of one process is pointless, so the entry point
asks the same detectors first:

* ``--coordinator_address`` / ``--num_processes`` > 1 (with ``--process_id``): those values;
* SLURM (``srun``: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
  ``SLURM_LOCALID``), Open MPI (``mpirun``) and Cloud TPU (a VM of a slice with several workers,
  several slices, or a GKE TPU pod set): initialised from the environment when it has more
  than one process;
* ``--distributed``: initialised with no arguments whatever the detection says (an environment
  of one process, Kubernetes);
* otherwise (a laptop, one GPU machine, a single-host TPU VM): one process, nothing to join.

One stage line says which: ``multi-process: SLURM, 2 processes, this is 0``. The detectors are
private JAX names; tests/test_multihost.py fails loudly if they move.
"""

import logging
from typing import Any

import jax
from jax._src import clusters

from byol_flax.errors import UserError
from byol_flax.runtime import commands, console

# The environments joined without --distributed, by JAX's class name, as the stage line names
# them. Kubernetes (API calls, an extra package) and mpi4py (opt-in in JAX) need --distributed.
AUTO_DETECTED = {"OmpiCluster": "Open MPI", "SlurmCluster": "SLURM",
                 "GkeTpuCluster": "Cloud TPU (GKE)", "GceTpuCluster": "Cloud TPU VM"}


class DistributedError(UserError, RuntimeError):
    """The processes of a multi-process run cannot be joined as asked."""


def detect_cluster() -> tuple[str, type, int] | None:
    """The cluster JAX's ``initialize()`` would use, if it is one joined without
    ``--distributed``: its name, its ``ClusterEnv`` class and its process count. None when none
    is present; a count that cannot be read (a metadata server not answering) is a warning and
    counts as one process."""
    for env in clusters.ClusterEnv._cluster_types:
        if env.opt_in_only_method or env.__name__ not in AUTO_DETECTED:
            continue
        try:
            if not env.is_env_present():
                continue
            count = int(env.get_process_count())
        except Exception as error:  # noqa: BLE001 (a detector reading the network or a variable)
            logging.warning("%s detected but its process count cannot be read (%s): running as "
                            "one process; --distributed forces joining",
                            AUTO_DETECTED[env.__name__], commands.one_line(str(error)))
            return None
        return AUTO_DETECTED[env.__name__], env, count
    return None


def plan(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
         force: bool) -> tuple[str, dict[str, Any]] | None:
    """How to join (what the stage line names, the arguments of ``jax.distributed.initialize``),
    or None for a single-process run."""
    if coordinator_address or (num_processes or 1) > 1:
        return "--coordinator_address", {"coordinator_address": coordinator_address,
                                         "num_processes": num_processes,
                                         "process_id": process_id}
    detected = detect_cluster()
    if detected is not None and detected[2] > 1:
        name, env, _ = detected
        return name, {"cluster_detection_method": env.name}
    if force:
        return (detected[0] if detected else "--distributed"), {}
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, force: bool = False) -> None:
    """Joins the other processes of a multi-process run (nothing on a single process); must
    run before anything touches a device."""
    decided = plan(coordinator_address, num_processes, process_id, force)
    if decided is None:
        return
    how, arguments = decided
    if jax.config.jax_platforms in (None, "", "cpu"):
        # Collectives between CPU processes (a CPU test of a multi-host run; a GPU host's CPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**arguments)
    except ValueError as error:  # nothing detected: JAX's "coordinator_address should be defined"
        raise DistributedError(
            f"{how}: no cluster environment found to join ({error}); start the processes with "
            "srun or mpirun, on every worker of a Cloud TPU slice, or pass --coordinator_address, "
            "--num_processes and --process_id") from error
    console.stage("multi-process: %s, %d processes, this is %d", how, jax.process_count(),
                  jax.process_index())
