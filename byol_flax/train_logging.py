"""What the training loop reports, and the finiteness check of what it reports.

Logged scalars (TensorBoard, ``log.txt`` and ``<workdir>/metrics.jsonl``) are averages over the
steps since the previous logging step, accumulated on the devices; :data:`SNAPSHOT_KEYS` are the
values at the logging step. :class:`TrainingLogger` owns that window, the images/s timer, the
progress bar, CLU's periodic hooks, the metrics file and the collapse warning, so the loop in
:mod:`byol_flax.train` asks it once per step.
"""

import math
import time
from typing import Any

import jax
import ml_collections
from clu import metric_writers, periodic_actions
from clu.metrics import Average
from etils import epath

from byol_flax.checkpointing import lease
from byol_flax.collapse import warn_on_collapse
from byol_flax.errors import UserError
from byol_flax.runtime import console, logs
from byol_flax.storage import files, json_files, schemas
from byol_flax.train_step import Metrics

METRICS_FILE = "metrics.jsonl"
# Scalars of the step logged as their value at the logging step (schedule values and the
# finiteness flag); every other scalar of the step is averaged over the logging window.
SNAPSHOT_KEYS = ("learning_rate", "tau", "state_is_finite")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the bad state is never checkpointed."""


def check_finite(step: int, metrics: dict[str, Any], last_checkpoint: int | None) -> None:
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
        return json_files.loads(line, name=METRICS_FILE, spec=_METRICS_LINE)["step"]
    except files.StorageError:
        return math.inf


_METRICS_LINE = schemas.Obj({"step": int})
# One line per logging step: 1000 epochs of ImageNet at one line per 100 steps is ~3 MB.
METRICS_MAX_BYTES = 1 << 30


class MetricsFile:
    """``<workdir>/metrics.jsonl``: one JSON object per logging step (``step`` and every scalar
    written to TensorBoard for it) and one per monitoring step (``step`` and the monitors'
    results), for analysis without TensorBoard: ``pandas.read_json(path, lines=True)``. Written
    by process 0 and appended to across resumes; for a ``gs://`` workdir it lies beside the log
    file in the local directory ``logs.local_log_dir`` names (an object store cannot append).

    A resume from step k first drops the lines of later steps (written before a kill and about
    to be written again) and any line a kill cut short, so no step is written twice.
    """

    def __init__(self, workdir: epath.Path, resumed_step: int):
        path = workdir / METRICS_FILE
        if files.exists(path):
            text = files.read_text(path, what="metrics file", max_bytes=METRICS_MAX_BYTES)
            kept = "".join(line for line in text.splitlines(keepends=True)
                           if line.endswith("\n") and _logged_step(line) <= resumed_step)
            if kept != text:  # written beside it and renamed: a kill now loses nothing
                files.write_text(path, kept, what="metrics file")
        self._file = files.open_append(path, what="metrics file")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(json_files.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TrainingLogger:
    """The loop's reporting, as a context manager (leaving it closes the progress bar and the
    metrics file). Process 0 writes TensorBoard (through ``writer``), ``metrics.jsonl`` and the
    progress bar; every process logs its scalars and checks the loss at logging steps.
    :attr:`scalars` holds the last logged scalars with the monitors' results since."""

    def __init__(self, writer: metric_writers.MetricWriter, workdir: epath.Path,
                 config: ml_collections.ConfigDict, *, start_step: int, total_steps: int):
        self._is_chief = jax.process_index() == 0
        self._writer = writer
        self._every_steps = config.logging.every_steps
        self._batch_size = config.training.batch_size
        self._total_steps = total_steps
        self._hooks: list[periodic_actions.PeriodicAction] = []
        if self._is_chief:
            self._hooks.append(periodic_actions.ReportProgress(
                num_train_steps=total_steps, writer=writer, every_steps=config.logging.every_steps))
            if config.logging.profile_steps:
                self._hooks.append(periodic_actions.Profile(
                    num_profile_steps=config.logging.profile_steps, logdir=str(workdir)))
        self._window = None  # the running sums of the scalars since the last logging step
        self._timer = (time.perf_counter(), start_step)  # images/s since (time, step)
        self._step = start_step
        self.scalars: dict[str, float] = {}
        # The file first: if it cannot be opened, there is no progress bar to close.
        self._file = (MetricsFile(logs.local_log_dir(str(workdir)), start_step)
                      if self._is_chief else None)
        self._bar = (console.progress(total_steps, start_step, "pre-training")
                     if self._is_chief else None)

    def __enter__(self) -> "TrainingLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def accumulate(self, metrics: Metrics) -> None:
        """Adds a step's metrics to the window on the devices (inside the step's transfer
        guard: nothing crosses to the host)."""
        self._window = _accumulate(self._window, metrics)

    def after_step(self, step: int, metrics: Metrics, *, skipped_records: int,
                   last_checkpoint: int | None) -> None:
        """Progress hooks every step; at a logging step (every ``config.logging.every_steps``
        and the last), checks the loss (:func:`check_finite`) and writes the window's scalars
        before the step's save, so a kill from there on loses at most the monitors' line."""
        self._step = step
        for hook in self._hooks:
            hook(step)
        if self._bar is not None:
            self._bar.update(1)
        if step % self._every_steps and step != self._total_steps:
            return
        check_finite(step, metrics, last_checkpoint)
        scalars, self._window = _logged_scalars(self._window, metrics), None
        now = time.perf_counter()
        scalars["images_per_second"] = ((step - self._timer[1]) * self._batch_size
                                        / (now - self._timer[0]))
        scalars["skipped_records"] = skipped_records
        self._timer = (now, step)
        lease.fence()  # a run whose workdir was taken over writes nothing more
        self._writer.write_scalars(step, scalars)
        # Flushed now: TensorBoard's writer otherwise keeps events buffered for its background
        # thread, which a frozen-then-thawed run would flush after its fence (the relaunch
        # benchmark saw its events file written after the thaw).
        self._writer.flush()
        if self._file is not None:
            self._file.write(step, scalars)
        warn_on_collapse(step, scalars)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                                  img_s=f"{scalars['images_per_second']:.0f}", refresh=False)
        self.scalars = scalars

    def log_monitor(self, step: int, results: dict[str, float]) -> None:
        """The monitor's results of ``step``: written, and added to :attr:`scalars`."""
        lease.fence()
        self._writer.write_scalars(step, results)
        self._writer.flush()
        self.scalars.update(results)
        if self._file is not None:
            self._file.write(step, results)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()

    def report_final(self, workdir: epath.Path) -> None:
        """``final_metrics.json`` and the console's closing line, by process 0; a re-run of a
        finished job trains nothing and keeps the file."""
        if not (self._is_chief and self.scalars):
            return
        lease.fence()
        json_files.write(workdir / "final_metrics.json", self.scalars, indent=2, sort_keys=True,
                         what="final metrics")
        shown = ["loss", *sorted(k for k in self.scalars if k.startswith("knn/")),
                 "online_classifier/top1", "collapse/projection_effective_rank"]
        console.stage("pre-training stopped at step %d of %d: %s", self._step, self._total_steps,
                      ", ".join(f"{key} {self.scalars[key]:.3f}" for key in shown
                                if key in self.scalars))
