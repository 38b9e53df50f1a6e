"""The BYOL training loop: ``train_and_evaluate(config, workdir)``.

Reads top to bottom: set-up, mesh, data, model and step, checkpoint, loop. Each section calls the
module that owns the concept; the loop is steps, logging and monitors, and asks the checkpointer
once per step whether to save and whether to stop. Resume is automatic: if
``workdir/checkpoints`` holds a complete checkpoint, training continues from it exactly (state,
RNG and data position).

Logged scalars (TensorBoard, ``log.txt`` and ``<workdir>/metrics.jsonl``) are averages over the
steps since the previous logging step, accumulated on the devices; :data:`SNAPSHOT_KEYS` are the
values at the logging step.
"""

import copy
import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, parameter_overview, periodic_actions
from clu.metrics import Average
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from byol_flax.errors import UserError
from byol_flax.checkpointing import config_changes
from byol_flax.runtime import console
from byol_flax.runtime.outputs import OutputDirError, claim_output_dir
from byol_flax.runtime.memory import release_free_heap
from byol_flax.checkpointing import lease
from byol_flax.checkpointing import Checkpointer, Restored, committed_steps
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.config import training_steps, validate_config
from byol_flax.data.pipeline import OpenedSplit, open_split, train_dataset, views_only
from byol_flax.data.records import DataError
from byol_flax.evaluation import EVALUATORS, build_evaluators, monitor_data
from byol_flax.evaluation.base import needs_labels, reads_monitor_data
from byol_flax.export.init_from import InitSource, apply_init_from, check_init_from
from byol_flax.collapse import warn_on_collapse
from byol_flax.sharding import make_mesh, replicated_sharding, shard_batch
from byol_flax.train_state import create_train_state
from byol_flax.train_step import Metrics, StepFn, StepOptions, make_train_step

METRICS_FILE = "metrics.jsonl"
# Scalars of the step logged as their value at the logging step (schedule values and the
# finiteness flag); every other scalar of the step is averaged over the logging window.
SNAPSHOT_KEYS = ("learning_rate", "tau", "state_is_finite")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the bad state is never checkpointed."""


class WorkdirError(UserError, OSError):
    """The work directory cannot be created or written."""


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


@jax.jit
def _accumulate(window: dict[str, Average] | None, metrics: Metrics) -> dict[str, Average]:
    """The logging window's running sums with one more step, on the devices (no host sync; one
    compiled call per step, not an eager op per scalar)."""
    return _start_window(metrics) if window is None else _add_to_window(window, metrics)


def _step_averages(metrics: Metrics) -> dict[str, Average]:
    return {k: Average.from_model_output(v) for k, v in metrics.items() if k not in SNAPSHOT_KEYS}


_start_window = jax.jit(_step_averages)


@jax.jit
def _add_to_window(window: dict[str, Average], metrics: Metrics) -> dict[str, Average]:
    step = _step_averages(metrics)
    return {k: window[k].merge(step[k]) for k in step}


def _logged_scalars(window: dict[str, Average], metrics: Metrics) -> dict[str, float]:
    """The window's averages and this step's snapshots, in one device -> host copy."""
    window, snapshots = jax.device_get(
        (window, {k: metrics[k] for k in SNAPSHOT_KEYS if k in metrics}))
    return ({k: float(average.compute()) for k, average in window.items()}
            | {k: float(v) for k, v in snapshots.items()})


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsFile:
    """``<workdir>/metrics.jsonl``: one JSON object per logging step (``step`` and every scalar
    written to TensorBoard for it) and one per monitoring step (``step`` and the monitors'
    results), for analysis without TensorBoard: ``pandas.read_json(path, lines=True)``. Written
    by process 0 and appended to across resumes; for a ``gs://`` workdir it lies beside the log
    file in the local directory ``console.local_log_dir`` names (an object store cannot append).

    A resume from step k first drops the lines of later steps (written before a kill and about
    to be written again) and any line a kill cut short, so no step is written twice.
    """

    def __init__(self, workdir: epath.Path, resumed_step: int):
        path = workdir / METRICS_FILE
        if path.exists():
            text = path.read_text()
            kept = "".join(line for line in text.splitlines(keepends=True)
                           if line.endswith("\n") and _logged_step(line) <= resumed_step)
            if kept != text:  # written beside it and renamed: a kill now loses nothing
                staged = workdir / f".{METRICS_FILE}.tmp"
                staged.write_text(kept)
                staged.replace(path)
        self._file = path.open("a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# Jitted steps of this process, by everything their program depends on: runs that differ only
# in seed or host-side augmentation (the demo's seeds and recipes, tests) reuse the traced and
# compiled step instead of tracing it again (tens of seconds on a CPU).
_STEP_CACHE: dict[str, StepFn] = {}


def _cached_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                       options: StepOptions, *, total_steps: int, warmup_steps: int,
                       num_classes: int) -> StepFn:
    """The jitted step of ``options`` (built from ``config`` for ``total_steps`` and
    ``warmup_steps``), traced by an earlier run of this process if its program was the same."""
    program = {key: json.loads(config[key].to_json())
               for key in ("model", "optimizer", "target", "loss", "training", "augment")}
    program["augment"] = {k: v for k, v in program["augment"].items()  # host-side keys
                          if not k.startswith("crop_")}
    for view in ("view1", "view2"):
        program["augment"][view].pop("flip_prob")
    for init_only in ("init_from", "init_from_heads"):  # the weights a run starts from
        program["model"].pop(init_only, None)
    # The graph (and its optimizer) is a function of the model and optimizer configs.
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


def _init_source(config: ml_collections.ConfigDict, workdir: epath.Path) -> InitSource | None:
    """The export a new run starts from (``config.model.init_from``), checked before the data is
    opened; None for random init or when the workdir holds checkpoints (a resume: they hold the
    weights)."""
    if not config.model.init_from or committed_steps(workdir / "checkpoints"):
        return None
    return check_init_from(config)


def _run_monitors(step: int, evaluators: Sequence[tuple[str, Any]], state: nnx.State,
                  config: ml_collections.ConfigDict, guard: TerminationGuard
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
    is_chief = jax.process_index() == 0
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_chief)
    logging.info("config:\n%s", config)

    # --- Mesh --------------------------------------------------------------------------------
    mesh = make_mesh()
    logging.info("%d processes, %d devices (%s); mesh %s", jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape))

    # --- Model and step ----------------------------------------------------------------------
    total_steps, warmup_steps = training_steps(config, opened.num_records)
    options = StepOptions.from_config(config, total_steps, warmup_steps)
    num_classes = opened.manifest.num_classes if config.model.online_classifier else 0
    train_state = create_train_state(config, options.learning_rate, num_classes=num_classes)
    initialised_from = (apply_init_from(train_state, init_source)
                        if init_source is not None else None)
    graphdef, state = nnx.split(train_state)
    del train_state  # the replicated copy below is the one kept
    state = jax.device_put(state, replicated_sharding(mesh))
    parameter_overview.log_parameter_overview(
        nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state).online, nnx.Param)))
    step_fn = _cached_train_step(config, graphdef, mesh, options, total_steps=total_steps,
                                 warmup_steps=warmup_steps, num_classes=num_classes)
    batch_keys = ("view1", "view2", "label") if num_classes else ("view1", "view2")

    # --- Checkpoint --------------------------------------------------------------------------
    run = config_changes.run_record(config.to_json_best_effort(),
                                    config_changes.manifest_sha256(opened.data_dir))
    checkpointer = Checkpointer(workdir / "checkpoints", config, run, total_steps=total_steps,
                                termination=guard)
    restored = checkpointer.restore_latest(state, replicated_sharding(mesh))
    _record_config(workdir, config, restored, run, allow_config_change)
    if restored.step and config.model.init_from:
        logging.info("config.model.init_from=%r not applied: resumed at step %d, whose "
                     "checkpoint holds the weights", config.model.init_from, restored.step)
    elif initialised_from is not None and is_chief:
        config_changes.record_init(workdir, "model.init_from", initialised_from)
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
    skipped = counters.get("skipped_records", 0)  # restored: the bound holds across resumes
    previous = None  # (step, metrics): checked one step late, so the host never stalls the device
    window = None  # the running sums of the scalars since the last logging step, on the devices
    scalars: dict[str, float] = {}
    timer = (time.perf_counter(), start_step)
    bar = console.progress(total_steps, start_step, "pre-training") if is_chief else None
    metrics_file = None
    try:
        if is_chief:
            metrics_file = MetricsFile(console.local_log_dir(str(workdir)), start_step)
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
                if step == start_step + 1:
                    # Compile ahead of the first call (the jit's cache keeps the executable),
                    # then hand the compiler's freed heap back to the OS before the step's own
                    # buffers are allocated: ~0.9 GB less peak RSS for ResNet-50 on a CPU.
                    step_fn.lower(state, device_batch).compile()
                    release_free_heap()
                # Anything else crossing host <-> device inside the step (a NumPy array or Python
                # scalar in the state, a retrace's constants) is an error, not a silent stall.
                with jax.transfer_guard("disallow"):
                    state, metrics = step_fn(state, device_batch)
                    window = _accumulate(window, metrics)
            if previous is not None:
                _check_finite(*previous, checkpointer.last_saved)
            checkpointer.check_for_errors()
            previous = (step, metrics)
            for hook in hooks:
                hook(step)
            if bar is not None:
                bar.update(1)

            if step % config.logging.every_steps == 0 or step == total_steps:
                _check_finite(step, metrics, checkpointer.last_saved)
                scalars, window = _logged_scalars(window, metrics), None
                now = time.perf_counter()
                scalars["images_per_second"] = ((step - timer[1]) * config.training.batch_size
                                                / (now - timer[0]))
                scalars["skipped_records"] = skipped
                timer = (now, step)
                writer.write_scalars(step, scalars)
                if metrics_file is not None:  # before the save: a kill from here on loses
                    metrics_file.write(step, scalars)  # at most the monitors' line
                warn_on_collapse(step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                                    img_s=f"{scalars['images_per_second']:.0f}", refresh=False)

            # Save first, then monitor: a preemption notice or a failing monitor never costs
            # the step's checkpoint. The checkpointer decides (cadence, last step, preemption).
            stop = checkpointer.maybe_save(
                step, state, {"skipped_records": skipped, "examples_consumed": examples_consumed},
                check=functools.partial(_check_finite, step, metrics, checkpointer.last_saved))
            if not stop and evaluators and (step % config.monitor.every_steps == 0
                                            or step == total_steps):
                results = _run_monitors(step, evaluators, state, config, guard)
                writer.write_scalars(step, results)
                scalars.update(results)
                if metrics_file is not None:
                    metrics_file.write(step, results)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
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
