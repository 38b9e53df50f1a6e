"""The BYOL training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: set-up, mesh, model and step, checkpoint, data, loop. Each section calls the
module that owns the concept; the loop is steps, and once per step it asks the logger
(:mod:`byol_flax.train_logging`) to report, the checkpointer whether to save and whether to stop,
and the monitor (:mod:`byol_flax.evaluation.monitor`) whether to evaluate. Resume is automatic:
if ``workdir/checkpoints`` holds a complete checkpoint, training continues from it exactly
(state, RNG and data position).
"""

import contextlib
import copy
import functools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from byol_flax.checkpointing import Checkpointer, Restored, committed_steps, config_changes, lease
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.config import step_program, training_steps, validate_config
from byol_flax.data.pipeline import OpenedSplit, open_split, train_dataset, views_only
from byol_flax.data.records import DataError
from byol_flax.errors import UserError
from byol_flax.evaluation.base import needs_labels, reads_monitor_data
from byol_flax.evaluation.config import monitor_data
from byol_flax.evaluation.evaluators import EVALUATORS
from byol_flax.evaluation.monitor import Monitor, build_state_evaluators
from byol_flax.init_from import InitSource, apply_init_from, check_init_from
from byol_flax.runtime import console
from byol_flax.runtime.memory import release_free_heap
from byol_flax.runtime.outputs import OutputDirError, claim_output_dir
from byol_flax.sharding import make_mesh, replicate, replicated_sharding, shard_batch
from byol_flax.storage import files, tensorboard
from byol_flax.train_logging import TrainingLogger, check_finite
from byol_flax.train_state import create_train_state
from byol_flax.train_step import StepFn, StepOptions, make_train_step


class WorkdirError(UserError, OSError):
    """The work directory cannot be created or written."""


# Jitted steps of this process, by everything their program depends on: runs that differ only
# in seed or host-side augmentation (the demo's seeds and recipes, tests) reuse the traced and
# compiled step instead of tracing it again (tens of seconds on a CPU).
_STEP_CACHE: dict[str, StepFn] = {}


def _cached_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                       options: StepOptions, *, total_steps: int, warmup_steps: int,
                       num_classes: int) -> StepFn:
    """The jitted step of ``options`` (built from ``config`` for ``total_steps`` and
    ``warmup_steps``), traced by an earlier run of this process if its program was the same."""
    # The keys whose role says the step reads them (config.step_program); the graph and its
    # optimizer are functions of those too.
    program = step_program(config)
    key = json.dumps([program, total_steps, warmup_steps, num_classes,
                      [d.id for d in mesh.devices.flat]], sort_keys=True)
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = make_train_step(graphdef, mesh, options)
    return _STEP_CACHE[key]


def plan_label_users(config: ml_collections.ConfigDict, num_classes: int,
                     monitor_classes: int | None = None) -> ml_collections.ConfigDict:
    """The config the run will use, decided before anything compiles: without labels in the data
    an evaluator reads (``num_classes`` of the training data; ``monitor_classes`` of
    ``config.monitor.data_dir`` for evaluators that read it, the training data's when None), the
    online classifier and the monitors that need labels are switched off, with one log line
    saying which and why. ``config`` itself is not modified."""
    config = copy.deepcopy(config)
    monitor_classes = num_classes if monitor_classes is None else monitor_classes
    no_labels = f"the data in {config.data.dir} has no labels"
    reasons = {}  # what is switched off -> why
    if num_classes == 0 and config.model.online_classifier:
        config.model.online_classifier = False
        reasons["online classifier"] = no_labels
    kept = []
    for name in config.monitor.evaluators:
        evaluator = EVALUATORS.get(name)
        own_data = reads_monitor_data(evaluator) and config.monitor.data_dir
        classes = monitor_classes if own_data else num_classes
        if needs_labels(evaluator) and classes == 0:
            reasons[f"{name} monitor"] = (
                f"the data in {config.monitor.data_dir} has no labels" if own_data else
                no_labels + ("; config.monitor.data_dir can name a labelled dataset for it"
                             if reads_monitor_data(evaluator) else ""))
        elif name == "online_classifier" and not config.model.online_classifier:
            reasons[f"{name} monitor"] = "config.model.online_classifier is False"
        else:
            kept.append(name)
    config.monitor.evaluators = tuple(kept)
    if reasons:
        by_reason: dict[str, list[str]] = {}
        for what, why in reasons.items():
            by_reason.setdefault(why, []).append(what)
        logging.warning("switched off: %s", "; ".join(
            f"{', '.join(whats)} ({why})" for why, whats in by_reason.items()))
    return config


def _monitor_classes(config: ml_collections.ConfigDict) -> int | None:
    """Label count of ``config.monitor.data_dir`` (validated like training data), if set and
    monitors run."""
    if not (config.monitor.data_dir and config.monitor.every_steps and config.monitor.evaluators):
        return None
    return open_split(monitor_data(config), config.monitor.train_split).manifest.num_classes


def _lease(workdir: epath.Path, config: ml_collections.ConfigDict) -> lease.WorkdirLease | None:
    """Process 0 creates (or recognises) the workdir and takes its lease; every process learns
    the outcome, so a refused start stops all hosts instead of leaving them waiting for process
    0. A directory holding anything but an earlier run of this project is refused
    (:func:`byol_flax.runtime.outputs.claim_output_dir`)."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            claim_output_dir(workdir, "pretraining")
            held = lease.WorkdirLease(
                workdir, stale_after_seconds=config.checkpoint.lease_stale_after_seconds).acquire()
        except (lease.WorkdirBusyError, OutputDirError) as caught:
            error = caught
        except OSError as caught:
            error = WorkdirError(f"cannot write to the workdir {workdir}: {caught}")
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if refused and error is None:
            error = lease.WorkdirBusyError(f"process 0 could not take the lease of {workdir}: "
                                           "see its log")
    if error is not None:
        raise error
    return held


def _record_config(workdir: epath.Path, config: ml_collections.ConfigDict,
                   restored: Restored, run: dict[str, Any],
                   allow_config_change: Sequence[str]) -> None:
    """Refuses a resume that changes what is trained (unless allowed), records accepted changes
    and the code trained with from here on, and only then writes ``config.json`` (never
    silently replaced)."""
    changes = []
    if restored.step:
        changes = config_changes.check_resume(restored.run, run, step=restored.step,
                                              where=str(workdir),
                                              allowed=allow_config_change)
    if jax.process_index() != 0:
        return
    config_changes.record_changes(workdir, restored.step or 0, changes)
    config_changes.record_code(workdir, restored.step or 0, restored.run if restored.step else None,
                               run)
    text = config.to_json_best_effort(indent=2)
    path = workdir / config_changes.CONFIG_NAME
    files.check_writable(path, what="config")  # a planted link: refused before it is read
    if files.exists(path) and files.read_text(path, what="config") != text and not changes:
        logging.warning("%s differed from this run's config and was rewritten (no checkpoint "
                        "recorded the old one)", path)
    files.write_text(path, text, what="config")


def _init_source(config: ml_collections.ConfigDict, workdir: epath.Path) -> InitSource | None:
    """The export a new run starts from (``config.model.init_from``), checked before the data is
    opened; None for random init or when the workdir holds checkpoints (a resume: they hold the
    weights)."""
    if not config.model.init_from or committed_steps(workdir / "checkpoints"):
        return None
    return check_init_from(config)


def _model_and_step(config: ml_collections.ConfigDict, mesh: Mesh, init_source: InitSource | None,
                    *, total_steps: int, warmup_steps: int, num_classes: int
                    ) -> tuple[nnx.GraphDef, nnx.State, StepFn, dict[str, Any] | None]:
    """The new run's state replicated over ``mesh`` (``init_source``'s weights when given), its
    jitted step, and the ``init_from`` provenance to record (None without one)."""
    options = StepOptions.from_config(config, total_steps, warmup_steps)
    train_state = create_train_state(config, options.learning_rate, num_classes=num_classes)
    initialised_from = (apply_init_from(train_state, init_source)
                        if init_source is not None else None)
    graphdef, state = nnx.split(train_state)
    del train_state  # the replicated copy below is the one kept
    state = replicate(state, mesh)
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state).online, nnx.Param)))
    step_fn = _cached_train_step(config, graphdef, mesh, options, total_steps=total_steps,
                                 warmup_steps=warmup_steps, num_classes=num_classes)
    return graphdef, state, step_fn, initialised_from


def _restore(config: ml_collections.ConfigDict, workdir: epath.Path, opened: OpenedSplit,
             state: nnx.State, mesh: Mesh, guard: TerminationGuard,
             allow_config_change: Sequence[str], *, total_steps: int
             ) -> tuple[Checkpointer, Restored]:
    """The run's checkpointer and its newest valid checkpoint (``state`` at step None when there
    is none), restored into ``state``'s replicated layout; a resume's config changes are checked
    and recorded before anything trains."""
    run = config_changes.run_record(config.to_json_best_effort(),
                                    config_changes.manifest_sha256(opened.data_dir))
    checkpointer = Checkpointer(workdir / "checkpoints", config, run, total_steps=total_steps,
                                termination=guard)
    restored = checkpointer.restore_latest(state, replicated_sharding(mesh))
    _record_config(workdir, config, restored, run, allow_config_change)
    return checkpointer, restored


def _record_start(workdir: epath.Path, config: ml_collections.ConfigDict,
                  resumed_step: int | None, initialised_from: dict[str, Any] | None, *,
                  total_steps: int) -> None:
    """Where the run's weights come from: a resume's checkpoint (``model.init_from`` is not
    applied then, and the log says so) or, for a new run, the export recorded in the config
    history."""
    if resumed_step and config.model.init_from:
        logging.info("config.model.init_from=%r not applied: resumed at step %d, whose "
                     "checkpoint holds the weights", config.model.init_from, resumed_step)
    elif initialised_from is not None and jax.process_index() == 0:
        config_changes.record_init(workdir, "model.init_from", initialised_from)
    if resumed_step:
        console.stage("resuming at step %d of %d", resumed_step, total_steps)


class TrainBatches:
    """The training batches from the restored position, on the devices, and the counters a
    checkpoint records with the state: ``examples_consumed`` (the position in the global stream,
    so the pipeline restarts exactly there whatever the worker or process count) and
    ``skipped_records`` (undecodable records skipped; restored, so
    ``config.data.max_skipped_records`` bounds the whole run, across resumes)."""

    def __init__(self, config: ml_collections.ConfigDict, opened: OpenedSplit, mesh: Mesh,
                 restored: Restored, *, with_labels: bool):
        self._batch_size = config.training.batch_size
        self._max_skipped = config.data.max_skipped_records
        self._mesh = mesh
        self._keys = ("view1", "view2", "label") if with_labels else ("view1", "view2")
        counters = restored.counters
        self.examples_consumed = counters["examples_consumed"] if restored.step else 0
        self.skipped_records = counters["skipped_records"] if restored.step else 0
        self._iterator = iter(train_dataset(config, opened, process_index=jax.process_index(),
                                            process_count=jax.process_count(),
                                            examples_consumed=self.examples_consumed))

    def next(self, step: int) -> dict[str, jax.Array]:
        """The batch of ``step``, sharded over the mesh: the one explicit copy to the devices."""
        batch = next(self._iterator)
        self.examples_consumed += self._batch_size
        self.skipped_records += int(np.sum(batch["skipped"]))
        if self.skipped_records > self._max_skipped:
            raise DataError(f"{self.skipped_records} undecodable records skipped by step {step}, "
                            f"more than config.data.max_skipped_records={self._max_skipped}")
        return shard_batch(views_only(batch, self._keys), self._mesh)

    def counters(self) -> dict[str, int]:
        return {"skipped_records": self.skipped_records,
                "examples_consumed": self.examples_consumed}


def _announce(config: ml_collections.ConfigDict, workdir: epath.Path, opened: OpenedSplit,
              total_steps: int, warmup_steps: int) -> None:
    console.stage("pre-training in %s: %d images, %d steps (%d warm-up) at batch %d on %d %s "
                  "device(s)%s", workdir, opened.num_records, total_steps, warmup_steps,
                  config.training.batch_size, jax.device_count(), jax.devices()[0].platform,
                  f"; monitors: {', '.join(config.monitor.evaluators)}"
                  if config.monitor.every_steps and config.monitor.evaluators else "")


def _compile_ahead(step_fn: StepFn, state: nnx.State, batch: dict[str, jax.Array]) -> None:
    """Compiles the step ahead of its first call (the jit's cache keeps the executable), then
    hands the compiler's freed heap back to the OS before the step's own buffers are allocated:
    ~0.9 GB less peak RSS for ResNet-50 on a CPU."""
    step_fn.lower(state, batch).compile()
    release_free_heap()


@contextlib.contextmanager
def _closing(checkpointer: Checkpointer,
             writer: tensorboard.MetricWriter) -> Iterator[None]:
    """However the loop ends: the save in flight committed (its error raised), then the
    checkpointer closed and the metric writer closed (on gs://: its last segment uploaded)."""
    try:
        yield
    finally:
        try:
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
            writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                       allow_config_change: Sequence[str] = ()) -> dict[str, float]:
    """Pre-trains BYOL as ``config`` says, in (or resuming from) ``workdir``.

    ``allow_config_change``: dotted config keys (or sections) a resume may change although they
    change what is trained (see :mod:`byol_flax.checkpointing.config_changes`). Returns the last
    logged scalars.
    """
    # --- Set-up ------------------------------------------------------------------------------
    # First, so a SIGTERM during start-up still ends in a clean save. Only on one process: under
    # jax.distributed the preemption service owns SIGTERM and Orbax's sync point makes every
    # host save the same step (a per-host flag could stop hosts at different steps).
    guard = TerminationGuard(enabled=jax.process_count() == 1)
    if "://" not in str(workdir):
        workdir = os.path.abspath(workdir)  # Orbax requires absolute local paths
    workdir = epath.Path(workdir)
    held = None
    try:
        validate_config(config, num_devices=jax.device_count())
        init_source = _init_source(config, workdir)
        opened = open_split(config.data, config.data.train_split)
        config = plan_label_users(config, opened.manifest.num_classes, _monitor_classes(config))
        held = _lease(workdir, config)
        return _train(config, workdir, opened, guard, allow_config_change, init_source)
    finally:
        guard.restore()
        if held is not None:
            held.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, opened: OpenedSplit,
           guard: TerminationGuard, allow_config_change: Sequence[str],
           init_source: InitSource | None) -> dict[str, float]:
    writer = tensorboard.create_writer(workdir, just_logging=jax.process_index() > 0,
                                       guard=lease.fence)
    logging.info("config:\n%s", config)

    # --- Mesh --------------------------------------------------------------------------------
    mesh = make_mesh()
    logging.info("%d processes, %d devices (%s); mesh %s", jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape))

    # --- Model and step ----------------------------------------------------------------------
    total_steps, warmup_steps = training_steps(config, opened.num_records)
    num_classes = opened.manifest.num_classes if config.model.online_classifier else 0
    graphdef, state, step_fn, initialised_from = _model_and_step(
        config, mesh, init_source, total_steps=total_steps, warmup_steps=warmup_steps,
        num_classes=num_classes)

    # --- Checkpoint --------------------------------------------------------------------------
    checkpointer, restored = _restore(config, workdir, opened, state, mesh, guard,
                                      allow_config_change, total_steps=total_steps)
    _record_start(workdir, config, restored.step, initialised_from, total_steps=total_steps)
    state, start_step = restored.state, restored.step or 0

    # --- Data --------------------------------------------------------------------------------
    batches = TrainBatches(config, opened, mesh, restored, with_labels=num_classes > 0)
    _announce(config, workdir, opened, total_steps, warmup_steps)

    # --- Loop --------------------------------------------------------------------------------
    monitor = Monitor(build_state_evaluators(config, mesh, graphdef), config,
                      total_steps=total_steps, termination=guard)
    previous = None  # (step, metrics): checked one step late, so the host never stalls the device
    with (_closing(checkpointer, writer),
          TrainingLogger(writer, workdir, config, start_step=start_step,
                         total_steps=total_steps) as logger):
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                device_batch = batches.next(step)
                if step == start_step + 1:
                    _compile_ahead(step_fn, state, device_batch)
                # Anything else crossing host <-> device inside the step (a NumPy array or Python
                # scalar in the state, a retrace's constants) is an error, not a silent stall.
                with jax.transfer_guard("disallow"):
                    state, metrics = step_fn(state, device_batch)
                    logger.accumulate(metrics)
            if previous is not None:
                check_finite(*previous, checkpointer.last_saved)
            checkpointer.check_for_errors()
            previous = (step, metrics)
            logger.after_step(step, metrics, skipped_records=batches.skipped_records,
                              last_checkpoint=checkpointer.last_saved)
            # Save first, then monitor: a preemption notice or a failing monitor never costs
            # the step's checkpoint. The checkpointer decides (cadence, last step, preemption).
            stop = checkpointer.maybe_save(
                step, state, batches.counters(),
                check=functools.partial(check_finite, step, metrics, checkpointer.last_saved))
            results = None if stop else monitor.maybe_run(step, state)
            if results is not None:
                logger.log_monitor(step, results)
            if stop:
                break
    logger.report_final(workdir)
    return logger.scalars
