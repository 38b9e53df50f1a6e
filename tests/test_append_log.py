"""Logs, metrics and TensorBoard events, locally and on gs:// (a Cloud Storage API server,
tests/gcs_server.py): appended locally, segments on gs:// read back as one history, a resume's
rewrite that a kill cannot half-do, the bound on what a kill loses, TensorBoard's own reader
finding every kind of record, and no TensorFlow anywhere in the commands."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from byol_flax.storage import append_log, files, gcs, tensorboard
from byol_flax.train_logging import MetricsFile, read_metrics
from tests.gcs_server import GcsServer


@pytest.fixture(scope="module")
def server():
    with GcsServer() as started:
        yield started


@pytest.fixture
def gs(server, monkeypatch):
    """A fresh gs:// directory, this process's clients pointed at the server."""
    import fsspec.config
    import gcsfs

    for name, value in gcs.derived_settings(server.emulator_host).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(gcs.EMULATOR_VARIABLE, server.emulator_host)
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield epath.Path(f"gs://bucket/{os.urandom(4).hex()}")
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(params=["local", "gs"])
def directory(request, tmp_path):
    return tmp_path if request.param == "local" else request.getfixturevalue("gs")


def test_lines_written_across_writers_read_back_as_one_history(directory):
    path = directory / "log.txt"
    for lines in (["a\n", "b\n"], ["c\n"]):  # a run, then its resume
        log = append_log.open_log(path, segment_seconds=60)
        for line in lines:
            log.write(line)
            log.flush()
        log.close()
    assert append_log.read_log(path) == "a\nb\nc\n"
    assert append_log.log_exists(path)
    append_log.rewrite_log(path, "a\n")
    assert append_log.read_log(path) == "a\n"
    with append_log.open_log(path, segment_seconds=60) as log:
        log.write("d\n")
    assert append_log.read_log(path) == "a\nd\n"
    assert append_log.read_log(directory / "absent.txt") == ""


def test_on_gs_a_segment_is_uploaded_by_its_age_without_a_flush_or_close(gs):
    path = gs / "metrics.jsonl"
    log = append_log.open_log(path, segment_seconds=0.3)
    log.write("early\n")
    assert append_log.read_log(path) == ""  # buffered
    deadline = time.monotonic() + 10
    while append_log.read_log(path) != "early\n":
        assert time.monotonic() < deadline, "the timer never uploaded the segment"
        time.sleep(0.1)
    log.write("late\n")
    log.close()
    assert append_log.read_log(path) == "early\nlate\n"
    names = sorted(p.name for p in gs.iterdir())
    assert len(names) == 2 and all(n.startswith("metrics.jsonl.") for n in names), names


def test_a_base_segment_hides_older_ones_even_when_their_deletion_never_happened(gs):
    path = gs / "metrics.jsonl"
    with append_log.open_log(path, segment_seconds=60) as log:
        log.write("old\n")
    older = sorted(gs.iterdir())
    # A rewrite killed after its base segment was written, before the older ones were deleted:
    files.write_bytes(append_log._new_segment(path, time.time_ns(), base=True),  # noqa: SLF001
                      b"new\n")
    assert all(p.exists() for p in older)
    assert append_log.read_log(path) == "new\n"
    with append_log.open_log(path, segment_seconds=60) as log:
        log.write("after\n")
    assert append_log.read_log(path) == "new\nafter\n"


def test_a_writer_compacts_its_segments_so_objects_stay_bounded(gs, monkeypatch):
    monkeypatch.setattr(append_log, "MAX_SEGMENTS", 3)
    path = gs / "log.txt"
    log = append_log.open_log(path, segment_seconds=60)
    for index in range(8):
        log.write(f"{index}\n")
        log.upload()
    log.close()
    assert append_log.read_log(path) == "".join(f"{i}\n" for i in range(8))
    assert len(list(gs.iterdir())) <= 3


def test_a_resume_drops_the_metrics_of_later_steps_on_gs(gs):
    metrics = MetricsFile(gs, 0)
    for step in range(1, 6):
        metrics.write(step, {"loss": float(step)})
    metrics.close()
    metrics = MetricsFile(gs, 3)  # resumed from the checkpoint of step 3
    metrics.write(4, {"loss": 40.0})
    metrics.close()
    lines = [json.loads(line) for line in read_metrics(gs).splitlines()]
    assert [(line["step"], line["loss"]) for line in lines] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


WRITER = """
import sys, time
from byol_flax.storage import append_log
log = append_log.open_log(sys.argv[1], segment_seconds=float(sys.argv[2]))
print("ready", flush=True)
while True:
    line = f"{time.time()!r}\\n"
    log.write(line)
    log.flush()
    print(line, end="", flush=True)  # what the writer wrote, for the test to compare
    time.sleep(0.02)
"""


def test_a_killed_writer_loses_at_most_the_last_segment_seconds_on_gs(gs, server):
    segment_seconds = 0.5
    path = gs / "log.txt"
    env = {**os.environ, gcs.EMULATOR_VARIABLE: server.emulator_host}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(segment_seconds)],
                              env=env, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(3)
    writer.kill()
    produced = [float(line) for line in writer.communicate()[0].splitlines()]
    written = [float(line) for line in append_log.read_log(path).splitlines()]
    # What was kept is what was written, in order, up to a point; the lines lost are those of
    # the last segment period (plus an upload's time) before the writer's last line. Measured
    # from that line, not the kill: a writer the machine starved writes nothing to lose.
    assert len(produced) > 20 and written == produced[:len(written)]
    assert produced[-1] - written[-1] < segment_seconds + 0.5, produced[-1] - written[-1]


def test_tensorboard_reads_every_kind_of_record_we_write(directory):
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    writer = tensorboard.create_writer(directory)
    writer.write_scalars(1, {"loss": 0.5, "tau": 0.99})
    writer.write_scalars(2, {"loss": 0.25})
    writer.write_images(2, {"views": np.random.default_rng(0).random((2, 8, 8, 3))})
    writer.write_histograms(2, {"weights": np.arange(100.0)})
    writer.write_texts(2, {"note": "hello"})
    writer.write_hparams({"learning_rate": 0.2, "encoder": "resnet18"})
    writer.close()

    events = plugin_event_accumulator.EventAccumulator(str(directory), size_guidance={
        "tensors": 0})
    events.Reload()
    by_plugin = {plugin: sorted(events.PluginTagToContent(plugin))
                 for plugin in ("scalars", "images", "histograms", "text", "hparams")}
    assert by_plugin == {"scalars": ["loss", "tau"], "images": ["views"],
                         "histograms": ["weights"], "text": ["note"],
                         "hparams": ["_hparams_/session_start_info"]}
    assert [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in events.Tensors("loss")] == [(1, 0.5), (2, 0.25)]
    image = tensor_util.make_ndarray(events.Tensors("views")[0].tensor_proto)
    assert image[:2].tolist() == [b"8", b"8"] and len(image) == 4  # width, height, 2 PNGs
    histogram = tensor_util.make_ndarray(events.Tensors("weights")[0].tensor_proto)
    assert histogram[:, 2].sum() == 100  # every value counted in a bucket


FINDER = """
import sys
attempts = []
class Recorder:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            attempts.append(name)
        return None
sys.meta_path.insert(0, Recorder())
import importlib
importlib.import_module(sys.argv[1])  # a command's module (each defines its own flags)
from etils import epath
epath.Path("gs://bucket/x")._backend  # noqa: B018  (epath's choice looks for TensorFlow)
print(attempts)
"""


@pytest.mark.parametrize("command", ["byol_flax.main", "byol_flax.evaluation.__main__",
                                     "byol_flax.export.__main__", "byol_flax.studies.demo"])
def test_no_command_imports_or_looks_for_tensorflow(command):
    done = subprocess.run([sys.executable, "-c", FINDER, command], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_profile_lands_in_the_workdir(directory):
    import jax.numpy as jnp

    from byol_flax import train_logging

    profile = train_logging._Profile(directory, start_step=0, num_steps=1)  # noqa: SLF001
    for step in range(1, train_logging.PROFILE_FIRST_STEP + 2):
        profile(step)
        jnp.ones(8).sum().block_until_ready()
    written = [p.name for run in (directory / "plugins" / "profile").iterdir()
               for p in run.iterdir()]
    assert any(name.endswith(".xplane.pb") for name in written), written
