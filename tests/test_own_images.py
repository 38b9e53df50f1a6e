"""Your own unlabeled images end to end: a folder the test writes is converted with
``--layout unlabeled``, pre-trained with byol_flax/configs/own_images.py and its default monitors
(those that need labels are switched off before compiling, in one log line), resumed, exported, and
evaluated on the labelled digits with the transfer protocol; evaluation on an unlabeled split is
refused naming it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from byol_flax.configs import eval_digits, own_images
from byol_flax.data.convert import digits, image_folder
from byol_flax.data.records import DataError
from byol_flax.evaluation.base import labelled_split
from byol_flax.export import model_card
from byol_flax.train import plan_label_users

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, HOLDOUT = 48, 8
# Tiny network and heads, 16-px crops, batch 16: 40 train images -> 2 steps per epoch.
SHRINK = ["--config.model.projector.hidden_size=32", "--config.model.projector.output_size=16",
          "--config.model.predictor.hidden_size=32", "--config.data.worker_count=0",
          "--config.checkpoint.every_steps=2", "--config.logging.every_steps=1",
          "--config.monitor.every_steps=2", "--config.training.warmup_epochs=1"]


def write_images(root: Path) -> None:
    """Coloured rectangles on noise, in nested folders, as a user's photo folder might be."""
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        image = rng.integers(0, 60, size=(24, 32, 3), dtype=np.uint8)
        top, left = rng.integers(0, 12), rng.integers(0, 16)
        image[top:top + 10, left:left + 14] = rng.integers(80, 256, size=3)
        folder = root / f"trip_{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"photo_{index:03d}.png")


def env() -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}


def pretrain(data_dir: Path, workdir: Path, *extra: str, epochs: int = 2
             ) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "byol_flax.main",
            f"--config={REPO / 'byol_flax' / 'configs' / 'own_images.py'}:data={data_dir},size=16,"
            f"encoder=resnet_tiny,batch=16,epochs={epochs}", f"--workdir={workdir}", *SHRINK,
            *extra]
    return subprocess.run(argv, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    write_images(root / "photos")
    assert image_folder.main(["--layout", "unlabeled", "--src", str(root / "photos"), "--out",
                              str(root / "data"), "--holdout-count", str(HOLDOUT)]) == 0
    return root / "data"


@pytest.mark.slow  # ~75 s: convert, pre-train, resume, export, transfer
def test_unlabeled_folder_pretrains_resumes_exports_and_transfers(unlabeled, tmp_path):
    workdir = tmp_path / "pretrain"
    first = pretrain(unlabeled, workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    switched = [line for line in first.stderr.splitlines() if "switched off:" in line]
    assert len(switched) == 1, first.stderr[-3000:]
    assert "online classifier" in switched[0] and "knn monitor" in switched[0]
    assert "has no labels" in switched[0] and "config.monitor.data_dir" in switched[0]
    assert f"{NUM_IMAGES - HOLDOUT} images, 5 steps" in first.stderr  # before compiling
    metrics = json.loads((workdir / "final_metrics.json").read_text())
    assert np.isfinite(metrics["loss"]) and "collapse/projection_std_ratio" in metrics
    assert not any(key.startswith(("knn/", "online_classifier/")) for key in metrics)

    longer = pretrain(unlabeled, workdir, "--allow_config_change=training.epochs", epochs=4)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resuming at step 5 of 10" in longer.stderr

    export_dir = model_card.export_with_model_card(str(workdir), str(tmp_path / "export"))
    card = model_card.read_model_card(export_dir)
    assert card["checkpoint"]["step"] == 10 and card["pretraining_data"]["train_records"] == 40

    digits_dir = tmp_path / "digits"
    assert digits.main(["--out", str(digits_dir), "--holdout-count", "150", "--no-progress"]) == 0
    evaluation = subprocess.run(
        [sys.executable, "-m", "byol_flax.evaluation",
         f"--config={REPO / 'byol_flax' / 'configs' / 'eval_digits.py'}:transfer_linear,"
         f"data={digits_dir}",
         f"--source={export_dir}", f"--workdir={tmp_path / 'transfer'}",
         "--config.transfer_linear.l2_count=3"],
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["protocol"] == "transfer_linear" and 0.0 <= result["test"]["top1"] <= 1.0
    assert model_card.read_model_card(export_dir)["evaluations"] == []  # a reader writes nothing
    model_card.add_results_to_card(export_dir, [str(tmp_path / "transfer")])
    assert len(model_card.read_model_card(export_dir)["evaluations"]) == 1


def test_evaluation_on_an_unlabeled_split_is_refused_naming_it(unlabeled):
    config = eval_digits.get_config(f"linear,data={unlabeled}")
    config.data.num_classes = 0
    config.data.source_image_size = ()
    with pytest.raises(DataError, match=r"config.data.train_split='train' of .* has no labels"):
        labelled_split(config, "train_split")


def test_a_labelled_monitor_dataset_keeps_the_knn_monitor_for_unlabeled_training(caplog):
    config = own_images.get_config("data=/my/photos,monitor=/data/digits")
    planned = plan_label_users(config, num_classes=0, monitor_classes=10)
    assert planned.monitor.evaluators == ("knn",)  # the online classifier needs training labels
    assert not planned.model.online_classifier
    unlabeled_monitor = plan_label_users(config, num_classes=0, monitor_classes=0)
    assert unlabeled_monitor.monitor.evaluators == ()
    assert "the data in /data/digits has no labels" in caplog.text


def test_own_images_config_arguments():
    config = own_images.get_config("/my/photos")
    assert (config.data.dir, config.data.image_size, config.model.encoder.name,
            config.training.batch_size, config.training.epochs) == (
        "/my/photos", 96, "resnet18", 256, 100.0)
    assert config.model.encoder.stem == "imagenet" and config.data.num_classes == 0
    # The paper's recipe otherwise (Appendix J.1 / Table 6), blur scaled to the crop size.
    assert config.optimizer.base_learning_rate == 0.2 and config.target.base_ema == 0.996
    assert config.augment.view1.blur_sigma_max == pytest.approx(2.0 * 96 / 224)
    small = own_images.get_config("data=/d,size=32,encoder=resnet50,batch=64,epochs=5")
    assert small.model.encoder.stem == "small" and small.training.batch_size == 64
    with pytest.raises(ValueError, match="unknown option"):
        own_images.get_config("data=/d,resolution=64")
    assert own_images.get_config().data.dir == "data/my_images"  # the README's path
