"""Training command: ``python -m byol_flax.main --config=NAME[:ARG] --workdir=DIR``
(``byol-train``).

NAME is a shipped config module (``digits_cpu``, ``byol_imagenet:r50x1``; byol_flax/configs/) or a
path to a ``.py`` file with ``get_config(arg)``.

Overrides: ``--config.training.batch_size=512`` etc. Multi-process: run the same command in every
process. Processes started by SLURM (``srun``) or Open MPI (``mpirun``), on every worker of a
multi-host Cloud TPU slice (several workers or slices, GKE included) join each other by
themselves, as ``jax.distributed.initialize()`` detects them; anywhere else pass
``--coordinator_address``, ``--num_processes`` and ``--process_id``, or ``--distributed`` to
make JAX detect a cluster it is not asked to by default (Kubernetes). A single-host TPU VM, a
GPU machine or a laptop is one process (:mod:`byol_flax.runtime.distributed`).

A problem with the config, data, workdir or checkpoints is one line naming the key, file or step
(exit status 1; 2 for a flag); the traceback goes to ``<workdir>/log.txt``
(:func:`byol_flax.runtime.commands.run_command`).
"""

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from byol_flax.runtime import commands, console, distributed, logs
from byol_flax.runtime.outputs import OutputDirError, claim_output_dir
from byol_flax.runtime.xla import configure_xla_flags
from byol_flax.train import WorkdirError, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config module.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (local or gs://).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run that no "
    "cluster environment describes (not needed under srun, mpirun or on a Cloud TPU slice).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with "
                                      "--coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process (with "
                                   "--coordinator_address).")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() with no arguments even where no "
    "multi-process cluster is detected (Kubernetes; the Cloud TPU launcher passes it). Not "
    "needed under SLURM (srun), Open MPI (mpirun) or on the workers of a multi-host Cloud TPU "
    "slice, which are joined by themselves.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    "allow_config_change", [], "Config keys (or sections, e.g. optimizer) a resume may change "
    "although they change what is trained; recorded in <workdir>/config_history.jsonl and the "
    "model card.")
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "Also print every log line on the console (they always go to "
    "<workdir>/log.txt).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_xla_flags()  # before the first computation
    try:
        # A user's folder is refused before the log file lands in it (byol_flax.runtime.outputs).
        claim_output_dir(_WORKDIR.value, "pretraining")
        log_file = logs.setup(_WORKDIR.value, verbose=_VERBOSE.value)
    except OutputDirError:
        raise  # one line of its own (run_command)
    except OSError as error:
        raise WorkdirError(f"cannot write to the workdir {_WORKDIR.value}: {error}") from error
    console.stage("byol_flax: full log in %s", log_file)
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           force=_DISTRIBUTED.value)
    logging.info("JAX process %d of %d, local devices %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    # A UserError (config, data, checkpoints, a diverged run) is one line: run_command.
    train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                       allow_config_change=_ALLOW_CONFIG_CHANGE.value)


def run() -> None:
    """Console entry point."""
    commands.run_command(main, __name__, config_flag="config")


if __name__ == "__main__":
    run()
