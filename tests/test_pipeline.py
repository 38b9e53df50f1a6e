"""The Grain pipeline: determinism, per-process slices, exact restore, bad shards and records."""

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.reliability_processes import children, process_alive  # /proc helpers
from byol_flax.config import base_config
from byol_flax.data import records
from byol_flax.data.pipeline import eval_dataset, open_split, train_dataset

REPO = Path(__file__).resolve().parents[1]

NUM_RECORDS, NUM_SHARDS, NUM_CLASSES = 36, 3, 4


def png_bytes(seed: int, size=(20, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(data_dir, bad_record_at: int | None = None) -> records.Manifest:
    examples = [records.Record(png_bytes(i), i % NUM_CLASSES, f"img/{i}")
                for i in range(NUM_RECORDS)]
    if bad_record_at is not None:
        examples[bad_record_at] = records.Record(b"not an image", 0, "bad")
    shards = []
    for index, chunk in enumerate(records.split_evenly(examples, NUM_SHARDS)):
        shards.append(records.write_shard(
            data_dir / records.shard_name("train", index, NUM_SHARDS), chunk))
    manifest = records.Manifest(
        dataset="test", label_names=tuple(str(i) for i in range(NUM_CLASSES)),
        splits={"train": records.SplitInfo(NUM_RECORDS, tuple(shards))},
        source={"image_size": [20, 24]})
    records.write_manifest(data_dir, manifest)
    return manifest


@pytest.fixture
def config(tmp_path):
    write_dataset(tmp_path)
    config = base_config()
    config.data.dir = str(tmp_path)
    config.data.image_size = 8
    config.data.worker_count = 0
    config.training.batch_size = 6
    return config


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_two_views_labels_and_indices(config):
    (batch,) = take(iter(train_dataset(config, open_split(config.data, "train"))), 1)
    assert batch["view1"].shape == batch["view2"].shape == (6, 8, 8, 3)
    assert batch["view1"].dtype == np.uint8
    assert not np.array_equal(batch["view1"], batch["view2"])  # independent crops
    np.testing.assert_array_equal(batch["label"], batch["index"] % NUM_CLASSES)
    assert batch["skipped"].sum() == 0


def test_same_seed_same_batches_and_epochs_are_reshuffled(config):
    opened = open_split(config.data, "train")
    steps_per_epoch = NUM_RECORDS // 6
    a = take(iter(train_dataset(config, opened)), 2 * steps_per_epoch)
    b = take(iter(train_dataset(config, opened)), 2 * steps_per_epoch)
    assert_batches_equal(a, b)
    epoch = lambda batches: np.concatenate([x["index"] for x in batches])
    first, second = epoch(a[:steps_per_epoch]), epoch(a[steps_per_epoch:])
    assert sorted(first) == sorted(second) == list(range(NUM_RECORDS))  # each epoch: all once
    assert not np.array_equal(first, second)  # ... in a new order
    config.seed += 1
    c = take(iter(train_dataset(config, opened)), 1)
    assert not np.array_equal(c[0]["index"], a[0]["index"])


def test_reduced_decoding_keeps_every_random_draw_and_decodes_large_jpegs_smaller(
        config, tmp_path, monkeypatch):
    """augment.crop_reduced_decode: PNGs (no DCT scaling) give the very same batches, so the
    crops and flips are drawn exactly as before; large JPEGs are decoded at a fraction of their
    size and their views stay close to the full decode's."""
    opened = open_split(config.data, "train")
    full = take(iter(train_dataset(config, opened)), 2)
    config.augment.crop_reduced_decode = True
    assert_batches_equal(take(iter(train_dataset(config, opened)), 2), full)

    jpeg_dir = tmp_path / "jpegs"
    jpeg_dir.mkdir()
    y, x = np.mgrid[0:480, 0:640]
    smooth = lambda i: np.stack([128 + 100 * np.sin((x + 40 * i) / 60), 128 + 100 * np.cos(
        y / 45), (x + y + 30 * i) % 256], -1).astype(np.uint8)
    examples = []
    for i in range(12):
        buffer = io.BytesIO()
        Image.fromarray(smooth(i)).save(buffer, format="JPEG", quality=95)
        examples.append(records.Record(buffer.getvalue(), i % NUM_CLASSES, f"img/{i}"))
    shard = records.write_shard(jpeg_dir / records.shard_name("train", 0, 1), examples)
    records.write_manifest(jpeg_dir, records.Manifest(
        dataset="jpegs", label_names=tuple(str(i) for i in range(NUM_CLASSES)),
        splits={"train": records.SplitInfo(12, (shard,))}, source={"image_size": [480, 640]}))
    config.data.dir = str(jpeg_dir)
    config.data.image_size = 32
    from PIL import JpegImagePlugin

    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: (
        drafts.append(size), original_draft(self, mode, size))[1])
    jpeg_split = open_split(config.data, "train")
    reduced = take(iter(train_dataset(config, jpeg_split)), 2)
    assert drafts and all(size[0] < 640 for size in drafts)  # decoded at 1/2 .. 1/8
    config.augment.crop_reduced_decode = False
    exact = take(iter(train_dataset(config, jpeg_split)), 2)
    for a, b in zip(reduced, exact):
        np.testing.assert_array_equal(a["index"], b["index"])
        for view in ("view1", "view2"):
            difference = np.abs(a[view].astype(int) - b[view].astype(int))
            assert difference.mean() < 1.5, difference.mean()  # of 255 (measured 0.3):
                                                               # the same crop


def test_processes_read_disjoint_slices(config):
    opened = open_split(config.data, "train")
    per_process = []
    for process_index in range(2):
        it = iter(train_dataset(config, opened, process_index=process_index, process_count=2))
        batches = take(it, NUM_RECORDS // 6)  # local batch 3: one epoch across both processes
        assert batches[0]["view1"].shape[0] == 3
        per_process.append(set(np.concatenate([b["index"] for b in batches]).tolist()))
    assert per_process[0].isdisjoint(per_process[1])
    assert per_process[0] | per_process[1] == set(range(NUM_RECORDS))


def test_a_resumed_stream_continues_exactly_with_other_workers_and_processes(config):
    """The position is examples consumed, not a Grain iterator state, so a run read
    with 0 workers, resumed with 2, then resumed with 2 processes reads the uninterrupted
    global batches."""
    opened = open_split(config.data, "train")
    batch = config.training.batch_size
    uninterrupted = take(iter(train_dataset(config, opened)), 8)
    config.data.worker_count = 2
    with_workers = take(iter(train_dataset(config, opened, examples_consumed=3 * batch)), 2)
    assert_batches_equal(with_workers, uninterrupted[3:5])
    config.data.worker_count = 0
    parts = [take(iter(train_dataset(config, opened, process_index=p, process_count=2,
                                     examples_consumed=5 * batch)), 3) for p in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
    assert_batches_equal(joined, uninterrupted[5:8])


def test_a_grain_worker_exits_when_its_trainer_is_killed(tmp_path):
    """kill -9 of the trainer runs no clean-up: the workers notice the parent is gone."""
    program = (
        "import functools, os, sys, time, numpy as np, grain\n"
        "from absl import flags; flags.FLAGS.mark_as_parsed()\n"
        "from byol_flax.data.pipeline import exit_with_parent\n"
        "ds = grain.MapDataset.range(10**6).map(lambda i: np.full(4, i)).to_iter_dataset()\n"
        "it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=2),\n"
        "    worker_init_fn=functools.partial(exit_with_parent, trainer_pid=os.getpid())))\n"
        "next(it); print('ready', flush=True); time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                               text=True, cwd=REPO)
    assert trainer.stdout.readline().strip() == "ready"
    workers = children(trainer.pid)
    assert len(workers) >= 2
    trainer.kill()
    trainer.wait()
    deadline = time.time() + 30
    while any(process_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(process_alive(pid) for pid in workers)




def test_eval_dataset_is_one_ordered_pass(config):
    opened = open_split(config.data, "train")
    batches = list(eval_dataset(config, opened, batch_size=8))
    indices = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(indices, np.arange(NUM_RECORDS))
    assert batches[-1]["image"].shape == (NUM_RECORDS % 8, 8, 8, 3)


# ---- Bad input --------------------------------------------------------------------------------


def shard_file(config, index=1):
    return os.path.join(config.data.dir, records.shard_name("train", index, NUM_SHARDS))


def test_missing_directory_and_manifest(config, tmp_path):
    config.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(records.DataError, match="nowhere does not exist"):
        open_split(config.data, "train")
    (tmp_path / "empty").mkdir()
    config.data.dir = str(tmp_path / "empty")
    with pytest.raises(records.DataError, match="manifest.json is missing"):
        open_split(config.data, "train")
    config.data.dir = ""
    with pytest.raises(records.DataError, match="config.data.dir is empty"):
        open_split(config.data, "train")


def test_missing_and_empty_shards_are_named(config):
    path = shard_file(config)
    os.remove(path)
    with pytest.raises(records.DataError, match=f"{path}.* is missing"):
        open_split(config.data, "train")
    open(path, "wb").close()
    with pytest.raises(records.DataError, match=f"{path} is empty"):
        open_split(config.data, "train")


def test_truncated_shard_is_named_even_without_checksums(config):
    path = shard_file(config)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(records.DataError, match=f"shard {path} is corrupt"):
        open_split(config.data, "train")
    config.data.verify_checksums = False  # the record count check still catches it
    with pytest.raises(records.DataError, match=f"shard {path}"):
        open_split(config.data, "train")


def test_bit_flipped_shard_fails_its_checksum(config):
    path = shard_file(config, 0)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(records.DataError, match=f"shard {path} is corrupt: sha256"):
        open_split(config.data, "train")


def test_manifest_config_mismatch(config):
    config.data.num_classes = 1000
    with pytest.raises(records.DataError, match="num_classes=1000 .* has 4 label names"):
        open_split(config.data, "train")
    config.data.num_classes = 0
    config.data.source_image_size = (32, 32)
    with pytest.raises(records.DataError, match=r"source_image_size=\(32, 32\)"):
        open_split(config.data, "train")
    config.data.source_image_size = (20, 24)  # what the converter recorded: accepted
    open_split(config.data, "train")
    with pytest.raises(records.DataError, match="split 'validation' is not in"):
        open_split(config.data, "validation")


def test_undecodable_record_is_named_or_skipped_and_counted(config, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    write_dataset(bad_dir, bad_record_at=13)  # shard 1 holds records 12..23: local index 1
    config.data.dir = str(bad_dir)
    opened = open_split(config.data, "train")
    with pytest.raises(records.DataError,
                       match=r"record 1 of shard .*train-00001-of-00003.array_record cannot"):
        take(iter(train_dataset(config, opened)), NUM_RECORDS // 6)
    config.data.max_skipped_records = 5
    runs = [take(iter(train_dataset(config, opened)), NUM_RECORDS // 6) for _ in range(2)]
    assert_batches_equal(*runs)  # skipping is deterministic
    skipped = sum(int(b["skipped"].sum()) for b in runs[0])
    assert skipped == 1


def test_processes_together_read_exactly_the_single_process_batches(config):
    """Process p's rows are rows [p L, (p+1) L) of the global batch a single process reads."""
    opened = open_split(config.data, "train")
    single = take(iter(train_dataset(config, opened)), 3)
    parts = [take(iter(train_dataset(config, opened, process_index=p, process_count=2)), 3)
             for p in range(2)]
    for step, batch in enumerate(single):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key],
                err_msg=key)


def test_checksums_are_computed_once_per_process(config, monkeypatch):
    calls = []
    real = records.file_sha256
    monkeypatch.setattr(records, "file_sha256", lambda path: calls.append(path) or real(path))
    open_split(config.data, "train")
    assert len(calls) == NUM_SHARDS
    open_split(config.data, "train")  # e.g. the kNN monitor opening the training split again
    assert len(calls) == NUM_SHARDS
    os.remove(shard_file(config))  # cheap checks still run on every open
    with pytest.raises(records.DataError, match="is missing"):
        open_split(config.data, "train")
