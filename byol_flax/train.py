"""The BYOL training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: set-up, mesh, data, model and step, checkpoint, loop. Each section calls the
module that owns the concept. Resume is automatic: if ``workdir/checkpoints`` holds a complete
checkpoint, training continues from it exactly (state, RNG and data position).
"""

import copy
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from byol_flax.checkpointing import config_changes
from byol_flax.runtime import console
from byol_flax.checkpointing import lease
from byol_flax.checkpointing import Checkpointer, Restored
from byol_flax.config import training_steps, validate_config
from byol_flax.data.augment import make_device_augment
from byol_flax.data.pipeline import OpenedSplit, open_split, train_dataset, views_only
from byol_flax.data.records import DataError
from byol_flax.evaluation import EVALUATORS, build_evaluators, monitor_data
from byol_flax.schedules import build_schedules
from byol_flax.sharding import make_mesh, replicated_sharding, shard_batch
from byol_flax.train_state import create_train_state
from byol_flax.train_step import StepFn, make_train_step


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the bad state is never checkpointed."""


class WorkdirError(OSError):
    """The work directory cannot be created or written."""


class TerminationGuard:
    """Turns SIGTERM (single-host preemption notice, ``kill``) into a flag read at step ends.

    Orbax's preemption check covers multi-host runs under ``jax.distributed``; on one host the
    signal is ours to catch. The loop saves at the next step boundary and exits cleanly.
    """

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.requested = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, metrics: dict[str, Any], last_checkpoint: int | None) -> None:
    """The loss of ``step`` and the state it produced (parameters, statistics, momentum)."""
    loss = float(jax.device_get(metrics["loss"]))
    state_finite = bool(jax.device_get(metrics["state_is_finite"]))
    if not (math.isfinite(loss) and state_finite):
        what = f"loss is {loss}" if not math.isfinite(loss) else "the updated state is not finite"
        raise NonFiniteLossError(
            f"{what} at step {step}: training stopped and this state was not saved; "
            f"the newest checkpoint is step {last_checkpoint}. Lower the learning rate or check "
            "the data, then resume.")


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _warn_on_collapse(step: int, scalars: dict[str, float], fraction: float) -> None:
    for name in ("projection", "representation"):
        ratio = scalars.get(f"collapse/{name}_std_ratio")
        if ratio is not None and ratio < fraction:
            rank = scalars.get(f"collapse/{name}_effective_rank")  # not computed for y
            logging.warning(
                "step %d: possible collapse: batch std of normalised %ss is %.3f x 1/sqrt(d) "
                "(warning threshold %.3f)%s", step, name, ratio, fraction,
                "" if rank is None else f"; effective rank {rank:.1f}")


# Jitted steps of this process, by everything their program depends on: runs that differ only
# in seed or host-side augmentation (the demo's seeds and recipes, tests) reuse the traced and
# compiled step instead of tracing it again (tens of seconds on a CPU).
_STEP_CACHE: dict[str, StepFn] = {}


def _cached_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                       total_steps: int, warmup_steps: int, num_classes: int) -> StepFn:
    program = {key: json.loads(config[key].to_json())
               for key in ("model", "optimizer", "target", "loss", "training", "augment")}
    program["augment"] = {k: v for k, v in program["augment"].items()  # host-side keys
                          if not k.startswith("crop_")}
    for view in ("view1", "view2"):
        program["augment"][view].pop("flip_prob")
    # The graph (and its optimizer) is a function of the model and optimizer configs.
    key = json.dumps([program, total_steps, warmup_steps, num_classes,
                      [d.id for d in mesh.devices.flat]], sort_keys=True)
    if key not in _STEP_CACHE:
        learning_rate, target_ema = build_schedules(config, total_steps=total_steps,
                                                    warmup_steps=warmup_steps)
        _STEP_CACHE[key] = make_train_step(
            graphdef, mesh, learning_rate=learning_rate, target_ema=target_ema,
            augment=make_device_augment(config.augment),
            accumulation_steps=config.training.accumulation_steps, loss_config=config.loss,
            target_kind=config.target.kind)
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
        own_data = getattr(evaluator, "reads_monitor_data", False) and config.monitor.data_dir
        classes = monitor_classes if own_data else num_classes
        if getattr(evaluator, "needs_labels", False) and classes == 0:
            reasons[f"{name} monitor"] = (
                f"the data in {config.monitor.data_dir} has no labels" if own_data else
                no_labels + ("; config.monitor.data_dir can name a labelled dataset for it"
                             if getattr(evaluator, "reads_monitor_data", False) else ""))
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
    """Process 0 creates the workdir and takes its lease; every process learns the outcome, so a
    refused start stops all hosts instead of leaving them waiting for process 0."""
    held, error = None, None
    if jax.process_index() == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            held = lease.WorkdirLease(
                workdir, stale_after_seconds=config.checkpoint.lease_stale_after_seconds).acquire()
        except lease.WorkdirBusyError as caught:
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
    and only then writes ``config.json`` (never silently replaced)."""
    changes = []
    if restored.step and restored.run is None:
        logging.warning("checkpoint step %d has no saved config (written by an older version): "
                        "config changes on this resume are not checked", restored.step)
    elif restored.step:
        changes = config_changes.check_resume(restored.run, run, step=restored.step,
                                              where=str(workdir),
                                              allowed=allow_config_change)
    if jax.process_index() != 0:
        return
    config_changes.record_changes(workdir, restored.step or 0, changes)
    text = config.to_json_best_effort(indent=2)
    path = workdir / config_changes.CONFIG_NAME
    if path.exists() and path.read_text() != text and not changes:
        logging.warning("%s differed from this run's config and was rewritten (no checkpoint "
                        "recorded the old one)", path)
    path.write_text(text)


def _run_monitors(step: int, evaluators: Sequence[tuple[str, Any]], state: nnx.State,
                  config: ml_collections.ConfigDict, guard: "TerminationGuard"
                  ) -> dict[str, float]:
    """Runs the monitors after the step's save. A failing monitor is logged with its traceback
    and counted (``monitor_errors/<name>``), and training goes on unless
    ``config.monitor.errors_are_fatal``; a SIGTERM skips the monitors still to run."""
    scalars: dict[str, float] = {}
    for name, evaluator in evaluators:
        if guard.requested:
            logging.warning("step %d: SIGTERM pending, monitors %s skipped", step, name)
            break
        try:
            scalars.update(evaluator.run(state))
        except Exception:  # noqa: BLE001 - a monitor must not end a long run
            if config.monitor.errors_are_fatal:
                raise
            logging.exception("step %d: monitor %s failed; training continues "
                              "(config.monitor.errors_are_fatal makes this fatal)", step, name)
            scalars[f"monitor_errors/{name}"] = 1.0
    return scalars


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike, *,
                       allow_config_change: Sequence[str] = ()) -> dict[str, float]:
    """Pre-trains BYOL as ``config`` says, in (or resuming from) ``workdir``.

    ``allow_config_change``: dotted config keys (or sections) a resume may change although they
    change what is trained (see :mod:`byol_flax.checkpointing.config_changes`). Returns the last logged
    scalars.
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
        opened = open_split(config.data, config.data.train_split)
        config = plan_label_users(config, opened.manifest.num_classes, _monitor_classes(config))
        held = _lease(workdir, config)
        return _train(config, workdir, opened, guard, allow_config_change)
    finally:
        guard.restore()
        if held is not None:
            held.release()


def _train(config: ml_collections.ConfigDict, workdir: epath.Path, opened: OpenedSplit,
           guard: TerminationGuard, allow_config_change: Sequence[str]) -> dict[str, float]:
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    logging.info("config:\n%s", config)

    # --- Mesh --------------------------------------------------------------------------------
    mesh = make_mesh()
    logging.info("%d processes, %d devices (%s); mesh %s", jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape))

    # --- Model and step ----------------------------------------------------------------------
    total_steps, warmup_steps = training_steps(config, opened.num_records)
    learning_rate, target_ema = build_schedules(config, total_steps=total_steps,
                                                warmup_steps=warmup_steps)
    num_classes = opened.manifest.num_classes if config.model.online_classifier else 0
    graphdef, state = nnx.split(create_train_state(config, learning_rate,
                                                   num_classes=num_classes))
    state = jax.device_put(state, replicated_sharding(mesh))
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state).online, nnx.Param)))
    step_fn = _cached_train_step(config, graphdef, mesh, total_steps, warmup_steps, num_classes)
    batch_keys = ("view1", "view2", "label") if num_classes else ("view1", "view2")

    # --- Checkpoint --------------------------------------------------------------------------
    run = config_changes.run_record(config.to_json_best_effort(),
                                    config_changes.manifest_sha256(opened.data_dir))
    checkpointer = Checkpointer(workdir / "checkpoints", config, run)
    restored = checkpointer.restore_latest(state, replicated_sharding(mesh))
    _record_config(workdir, config, restored, run, allow_config_change)
    state, counters = restored.state, restored.counters
    start_step = restored.step or 0
    if start_step:
        console.stage("resuming at step %d of %d", start_step, total_steps)

    # --- Data --------------------------------------------------------------------------------
    # The position is examples consumed in the global stream (older checkpoints: steps x batch),
    # so the pipeline restarts exactly there whatever the worker or process count.
    examples_consumed = counters.get("examples_consumed",
                                     start_step * config.training.batch_size)
    data_iterator = iter(train_dataset(config, opened, process_index=jax.process_index(),
                                       process_count=jax.process_count(),
                                       examples_consumed=examples_consumed))
    console.stage("pre-training in %s: %d images, %d steps (%d warm-up) at batch %d on %d %s "
                  "device(s)%s", workdir, opened.num_records, total_steps, warmup_steps,
                  config.training.batch_size, jax.device_count(), jax.devices()[0].platform,
                  f"; monitors: {', '.join(config.monitor.evaluators)}"
                  if config.monitor.every_steps and config.monitor.evaluators else "")

    # --- Loop --------------------------------------------------------------------------------
    evaluators = list(zip(config.monitor.evaluators, build_evaluators(config, mesh, graphdef)))
    hooks = []
    if is_chief:
        hooks.append(periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                                     every_steps=config.logging.every_steps))
        if config.logging.profile_steps:
            hooks.append(periodic_actions.Profile(num_profile_steps=config.logging.profile_steps,
                                                  logdir=str(workdir)))
    last_checkpoint = start_step or None
    skipped = counters.get("skipped_records", 0)  # restored: the bound holds across resumes
    previous = None  # (step, metrics): checked one step late, so the host never stalls the device
    scalars: dict[str, float] = {}
    timer = (time.perf_counter(), start_step)
    bar = console.progress(total_steps, start_step, "pre-training") if is_chief else None
    try:
        for step in range(start_step + 1, total_steps + 1):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(data_iterator)
                examples_consumed += config.training.batch_size
                skipped += int(np.sum(batch["skipped"]))
                if skipped > config.data.max_skipped_records:
                    raise DataError(f"{skipped} undecodable records skipped by step {step}, more "
                                    f"than config.data.max_skipped_records="
                                    f"{config.data.max_skipped_records}")
                # The one explicit copy to the devices.
                device_batch = shard_batch(views_only(batch, batch_keys), mesh)
                # Anything else crossing host <-> device inside the step (a NumPy array or Python
                # scalar in the state, a retrace's constants) is an error, not a silent stall.
                with jax.transfer_guard("disallow"):
                    state, metrics = step_fn(state, device_batch)
            if previous is not None:
                _check_finite(*previous, last_checkpoint)
            checkpointer.check_for_errors()
            previous = (step, metrics)
            for hook in hooks:
                hook(step)
            if bar is not None:
                bar.update(1)

            if step % config.logging.every_steps == 0 or step == total_steps:
                _check_finite(step, metrics, last_checkpoint)
                scalars = _scalars(metrics)
                now = time.perf_counter()
                scalars["images_per_second"] = ((step - timer[1]) * config.training.batch_size
                                                / (now - timer[0]))
                scalars["skipped_records"] = skipped
                timer = (now, step)
                writer.write_scalars(step, scalars)
                _warn_on_collapse(step, scalars, config.logging.collapse_warning_fraction)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                                    img_s=f"{scalars['images_per_second']:.0f}", refresh=False)

            # Save first, then monitor: a preemption notice or a failing monitor never costs
            # the step's checkpoint.
            preempted = guard.requested or checkpointer.reached_preemption(step)
            if step % config.checkpoint.every_steps == 0 or step == total_steps or preempted:
                _check_finite(step, metrics, last_checkpoint)
                checkpointer.save(step, state, force=True,
                                  counters={"skipped_records": skipped,
                                            "examples_consumed": examples_consumed})
                last_checkpoint = step
            if preempted:
                checkpointer.wait_until_finished()
                logging.warning("preempted: checkpoint of step %d committed; exiting. Re-run the "
                                "same command to resume.", step)
                break

            if evaluators and (step % config.monitor.every_steps == 0 or step == total_steps):
                results = _run_monitors(step, evaluators, state, config, guard)
                writer.write_scalars(step, results)
                scalars.update(results)
    finally:
        if bar is not None:
            bar.close()
        try:
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
            writer.flush()
    if is_chief and scalars:  # a re-run of a finished job trains nothing and keeps the file
        (workdir / "final_metrics.json").write_text(json.dumps(scalars, indent=2, sort_keys=True))
        shown = ["loss", *sorted(k for k in scalars if k.startswith("knn/")),
                 "online_classifier/top1", "collapse/projection_effective_rank"]
        console.stage("pre-training stopped at step %d of %d: %s", step,
                      total_steps, ", ".join(f"{key} {scalars[key]:.3f}" for key in shown
                                             if key in scalars))
    return scalars
