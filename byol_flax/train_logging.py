"""What the training loop reports, and the finiteness check of what it reports.

Logged scalars (TensorBoard, ``log.txt`` and ``<workdir>/metrics.jsonl``) are averages over the
steps since the previous logging step, accumulated on the devices; :data:`SNAPSHOT_KEYS` and the
collapse monitor's effective ranks (from the step's Gram matrices) are the values at the logging
step. :class:`TrainingLogger` owns that window, the images/s timer, the
progress bar and its ETA line, the profiler, the metrics file and the collapse warning, so the
loop in :mod:`byol_flax.train` asks it once per step.
"""

import datetime
import math
import pathlib
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging
from clu.metrics import Average
from etils import epath

from byol_flax.checkpointing import lease
from byol_flax.collapse import CollapseWatch, is_gram, with_effective_ranks
from byol_flax.errors import UserError
from byol_flax.runtime import console
from byol_flax.storage import append_log, files, json_files, schemas, tensorboard
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
    return {k: Average.from_model_output(v) for k, v in metrics.items()
            if k not in SNAPSHOT_KEYS and not is_gram(k)}


_start_window = jax.jit(_step_averages)


@jax.jit
def _add_to_window(window: dict[str, Average], metrics: Metrics) -> dict[str, Average]:
    step = _step_averages(metrics)
    return {k: window[k].merge(step[k]) for k in step}


def _logged_scalars(window: dict[str, Average], metrics: Metrics) -> dict[str, float]:
    """The window's averages and this step's snapshots, in one device -> host copy."""
    snapshots = with_effective_ranks({k: v for k, v in metrics.items()
                                      if k in SNAPSHOT_KEYS or is_gram(k)})
    window, snapshots = jax.device_get((window, snapshots))
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
    by process 0 and appended to across resumes; on ``gs://`` as segments
    (:mod:`byol_flax.storage.append_log`: :func:`read_metrics` reads them as one file, and a
    preemption loses at most the last ``append_log.SEGMENT_SECONDS`` of lines).

    A resume from step k first drops the lines of later steps (written before a kill and about
    to be written again) and any line a kill cut short, so no step is written twice.
    """

    def __init__(self, workdir: epath.Path, resumed_step: int, *,
                 guard: Callable[[], None] | None = None):
        path = workdir / METRICS_FILE
        text = read_metrics(workdir)  # "" for a new run: nothing to drop
        kept = "".join(line for line in text.splitlines(keepends=True)
                       if line.endswith("\n") and _logged_step(line) <= resumed_step)
        if kept != text:  # written beside it and renamed: a kill now loses nothing
            append_log.rewrite_log(path, kept, what="metrics file")
        self._file = append_log.open_log(path, what="metrics file", guard=guard)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(json_files.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(workdir: epath.PathLike) -> str:
    """The text of ``<workdir>/metrics.jsonl``, local or on ``gs://`` (its segments joined)."""
    return append_log.read_log(epath.Path(workdir) / METRICS_FILE, what="metrics file",
                               max_bytes=METRICS_MAX_BYTES)


# The profiler starts this many steps after the run (or its resume) starts: past the compile
# and the first steps' warm-up, as CLU's Profile did.
PROFILE_FIRST_STEP = 10


class _Profile:
    """A ``jax.profiler`` trace of ``num_steps`` steps, once per run, into
    ``<workdir>/plugins/profile`` (TensorBoard's profile plugin and XProf read it). A ``gs://``
    workdir gets the trace copied up through the storage layer when it stops."""

    def __init__(self, workdir: epath.Path, start_step: int, num_steps: int):
        self._workdir = workdir
        self._start = start_step + PROFILE_FIRST_STEP
        self._stop = self._start + num_steps
        self._local = (pathlib.Path(tempfile.mkdtemp(prefix="byol_flax_profile_"))
                       if files.is_remote(workdir) else workdir)

    def __call__(self, step: int) -> None:
        if step == self._start:
            jax.profiler.start_trace(str(self._local))
        elif step == self._stop:
            jax.profiler.stop_trace()
            if self._local != self._workdir:
                for path in self._local.rglob("*"):
                    if path.is_file():
                        files.write_bytes(self._workdir / str(path.relative_to(self._local)),
                                          files.read_bytes(path, what="profile",
                                                           max_bytes=files.GiB * 8),
                                          what="profile")
            logging.info("profile of steps %d-%d written to %s/plugins/profile", self._start,
                         self._stop - 1, self._workdir)


class TrainingLogger:
    """The loop's reporting, as a context manager (leaving it closes the progress bar and the
    metrics file). Process 0 writes TensorBoard (through ``writer``), ``metrics.jsonl`` and the
    progress bar; every process logs its scalars and checks the loss at logging steps.
    :attr:`scalars` holds the last logged scalars with the monitors' results since."""

    def __init__(self, writer: tensorboard.MetricWriter, workdir: epath.Path,
                 config: ml_collections.ConfigDict, *, start_step: int, total_steps: int):
        self._is_chief = jax.process_index() == 0
        self._writer = writer
        self._every_steps = config.logging.every_steps
        self._batch_size = config.training.batch_size
        self._total_steps = total_steps
        self._profile = (_Profile(workdir, start_step, config.logging.profile_steps)
                         if self._is_chief and config.logging.profile_steps else None)
        self._started = (time.perf_counter(), start_step)  # for the ETA
        self._window = None  # the running sums of the scalars since the last logging step
        self._timer = (time.perf_counter(), start_step)  # images/s since (time, step)
        self._step = start_step
        self._collapse_watch = CollapseWatch()
        self.scalars: dict[str, float] = {}
        # The file first: if it cannot be opened, there is no progress bar to close.
        self._file = (MetricsFile(workdir, start_step, guard=lease.fence)
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
        if self._profile is not None:
            self._profile(step)
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
        steps_per_second = (step - self._started[1]) / max(now - self._started[0], 1e-9)
        logging.info("step %d of %d, %.2f steps/s, ETA %s", step, self._total_steps,
                     steps_per_second, datetime.timedelta(seconds=round(
                         (self._total_steps - step) / max(steps_per_second, 1e-9))))
        lease.fence()  # a run whose workdir was taken over writes nothing more
        self._write(step, scalars)
        self._collapse_watch(step, scalars)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{scalars['loss']:.3f}",
                                  img_s=f"{scalars['images_per_second']:.0f}", refresh=False)
        self.scalars = scalars

    def log_monitor(self, step: int, results: dict[str, float]) -> None:
        """The monitor's results of ``step``: written, and added to :attr:`scalars`."""
        lease.fence()
        self._write(step, results)
        self.scalars.update(results)

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        """The metrics file, then TensorBoard, then the log line, each written through at once:
        a process frozen right after a step's log line (the relaunch benchmark freezes it
        there) has nothing of that step left to write when it is thawed after its successor
        took over; its next write is preceded by a fence."""
        if self._file is not None:
            self._file.write(step, scalars)
        self._writer.write_scalars(step, scalars)
        self._writer.flush()

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
