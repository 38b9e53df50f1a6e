"""TensorBoard events without TensorFlow, behind CLU's ``MetricWriter`` interface.

CLU's ``SummaryWriter`` writes through ``tf.summary``: TensorFlow (1.3 GB, ~9 s added to the
start of every command) for a few records per logging step, and TensorFlow's GCS filesystem,
which no test server can stand in for. :class:`EventWriter` writes the same records (scalars,
images, histograms, texts, hparams, raw tensor summaries, each with the plugin metadata
TensorBoard's dashboards read) with the ``tensorboard`` package's own protos and record
framing, through :mod:`byol_flax.storage.append_log`: one event file appended to locally, event
files written as segments on ``gs://`` (TensorBoard reads every ``*tfevents*`` file of a
directory in name order).

``clu.metric_writers``'s ``__init__`` imports the TensorFlow writer, so :func:`_clu_writers`
loads the package's TensorFlow-free modules (the interface, ``LoggingWriter``,
``MultiWriter``) without running it.
"""

import importlib.util
import io
import os
import socket
import sys
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from byol_flax.storage import append_log


def _clu_writers() -> types.ModuleType:
    """``clu.metric_writers`` with its TensorFlow-free submodules, its ``__init__`` not run
    unless something imported it already."""
    name = "clu.metric_writers"
    if name not in sys.modules:
        origin = importlib.util.find_spec("clu").submodule_search_locations[0]
        package = types.ModuleType(name, "CLU's metric writers, loaded without SummaryWriter")
        package.__path__ = [os.path.join(origin, "metric_writers")]
        package.__package__ = name
        sys.modules[name] = package
        import clu
        clu.metric_writers = package
    for module in ("interface", "logging_writer", "multi_writer"):
        importlib.import_module(f"{name}.{module}")
    return sys.modules[name]


_writers = _clu_writers()
MetricWriter = _writers.interface.MetricWriter
LoggingWriter = _writers.logging_writer.LoggingWriter
MultiWriter = _writers.multi_writer.MultiWriter

EVENT_FILE_PREFIX = "events.out.tfevents"
_FILE_VERSION = "brain.Event:2"


def _png(image: np.ndarray) -> bytes:
    from PIL import Image  # the image encoder only where images are written

    image = np.asarray(image)
    if image.dtype != np.uint8:  # floats in [0, 1], as tf.summary.image takes them
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class EventWriter(MetricWriter):
    """A TensorBoard event file in ``logdir`` (local or ``gs://``). ``guard`` runs before
    every upload to ``gs://`` (the workdir lease's fence); ``segment_seconds`` bounds what a
    preemption loses there."""

    def __init__(self, logdir: epath.PathLike, *, guard: Callable[[], None] | None = None,
                 segment_seconds: float = append_log.SEGMENT_SECONDS):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        name = (f"{EVENT_FILE_PREFIX}.{int(time.time()):010d}.{socket.gethostname()}"
                f".{os.getpid()}.v2")
        self._records = RecordWriter(append_log.open_log(
            epath.Path(logdir) / name, what="TensorBoard event file", binary=True,
            compact=False, guard=guard, segment_seconds=segment_seconds))
        self._write_event(self._event(wall_time=time.time(), file_version=_FILE_VERSION))

    def _write_event(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def _write_values(self, step: int, values: list) -> None:
        if values:
            self._write_event(self._event(wall_time=time.time(), step=int(step),
                                          summary=self._summary(value=values)))

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        from tensorboard.util import tensor_util

        self._write_values(step, [
            self._summary.Value(tag=tag, tensor=tensor_util.make_tensor_proto(np.asarray(value)),
                                metadata=(metadata or {}).get(tag))
            for tag, value in values.items()])

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        self._write_values(step, [value for tag, scalar in scalars.items()
                                  for value in scalar_pb(tag, float(scalar)).value])

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``images``: [H, W, C] or [N, H, W, C] arrays, uint8 or floats in [0, 1]."""
        from tensorboard.plugins.image import metadata
        from tensorboard.util import tensor_util

        values = []
        for tag, batch in images.items():
            batch = np.asarray(batch)
            batch = batch[None] if batch.ndim == 3 else batch
            encoded = [str(batch.shape[2]).encode(), str(batch.shape[1]).encode(),
                       *(_png(image) for image in batch)]
            values.append(self._summary.Value(
                tag=tag, metadata=metadata.create_summary_metadata(tag, ""),
                tensor=tensor_util.make_tensor_proto(np.array(encoded, dtype=object))))
        self._write_values(step, values)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        logging.log_first_n(logging.WARNING, "TensorBoard has no video dashboard: videos "
                            "%s of step %d not written", 1, sorted(videos), step)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        logging.log_first_n(logging.WARNING, "audio is not written by this writer: %s of step "
                            "%d not written", 1, sorted(audios), step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._write_values(step, [value for tag, text in texts.items()
                                  for value in text_pb(tag, text).value])

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        from tensorboard.plugins.histogram.summary_v2 import histogram_pb

        self._write_values(step, [
            value for tag, array in arrays.items()
            for value in histogram_pb(tag, np.asarray(array, np.float64).ravel(),
                                      buckets=(num_buckets or {}).get(tag, 30)).value])

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        plain = {k: v if isinstance(v, bool | int | float | str) else str(v)
                 for k, v in hparams.items()}
        self._write_values(0, list(hparams_pb(plain).value))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


def create_writer(logdir: epath.PathLike, *, just_logging: bool = False,
                  guard: Callable[[], None] | None = None) -> MetricWriter:
    """The writer of a command: the log (CLU's ``LoggingWriter``) and, unless
    ``just_logging`` (processes other than 0), TensorBoard events in ``logdir``."""
    if just_logging:
        return LoggingWriter()
    # Events first: a local event file is unbuffered, so a step's record is on disk before its
    # log line (a process frozen right after that line has nothing left to write when thawed).
    return MultiWriter([EventWriter(logdir, guard=guard), LoggingWriter()])
