"""A benchmark's ratio counts only from a quiet machine (benchmarks/quiet.py): what else used the
CPUs while it measured is measured too, and a loaded run reports no ratio, only why."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import quiet

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux /proc only")


def busy_neighbour() -> subprocess.Popen:
    """Another job on the machine: a process spinning on one CPU, not ours to wait for."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_a_window_beside_a_busy_process_is_not_quiet_and_says_why():
    neighbour = busy_neighbour()
    loads: list[quiet.Load] = []
    try:
        time.sleep(0.3)  # the neighbour is running
        with quiet.watch(loads):
            time.sleep(1.5)
    finally:
        neighbour.kill()
        neighbour.wait()
    (load,) = loads
    # One spinning process on this machine's CPUs: at least a CPU's share, minus scheduling.
    assert load.other_share > 0.8 / load.cpus
    assert not load.quiet
    assert load.reason().startswith("other processes used ")


def test_work_of_our_own_waited_children_is_ours_not_others():
    start = quiet.Sample(0.0, busy_seconds=100.0, steal_seconds=0.0, own_seconds=10.0,
                         load_average=1.0)
    ours = quiet.Sample(10.0, busy_seconds=119.5, steal_seconds=0.0, own_seconds=29.5,
                        load_average=1.9)
    load = quiet.Load.between(start, ours, cpus=2)  # 19.5 s busy, all of it ours
    assert load.other_share == 0.0 and load.quiet
    shared = quiet.Sample(10.0, busy_seconds=119.5, steal_seconds=0.0, own_seconds=19.5,
                          load_average=2.0)
    load = quiet.Load.between(start, shared, cpus=2)  # 10 of the 19.5 s were another's
    assert load.other_share == pytest.approx(10 / 20) and not load.quiet
    stolen = quiet.Sample(10.0, busy_seconds=119.5, steal_seconds=1.0, own_seconds=29.5,
                          load_average=1.0)
    assert quiet.Load.between(start, stolen, cpus=2).reason().startswith("the hypervisor")


def test_the_verdict_counts_only_when_every_round_was_quiet():
    calm = quiet.Load(10.0, 2, 0.01, 0.0, 1.0, 1.0)
    busy = quiet.Load(10.0, 2, 0.4, 0.0, 3.0, 3.5)
    assert quiet.verdict([calm, calm, calm])["quiet"]
    verdict = quiet.verdict([calm, busy, calm])
    assert not verdict["quiet"] and verdict["max_other_share"] == 0.4
    assert verdict["reason"].startswith("1 of 3 rounds were not quiet: other processes used 40%")
    assert not quiet.verdict([])["quiet"]


@pytest.mark.slow  # ~30 s: one process of our step at tiny size, then the comparison stops
def test_the_comparison_with_pytorch_beside_a_busy_process_reports_no_ratio():
    pytest.importorskip("torch")
    neighbour = busy_neighbour()
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--compare-torch",
             "--model", "resnet18", "--image-size", "16", "--batch", "8", "--steps", "1"],
            capture_output=True, text=True, cwd=ROOT, timeout=600)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert run.returncode == 3, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ratio_images_per_second"] is None
    assert result["stopped_after"] == "jax in round 1"
    assert "other processes used" in result["ratio_withheld"]
    assert "no ratio" in run.stdout


@pytest.mark.slow  # ~40 s: two tiny ViT steps, ours and PyTorch's
def test_moco_v3s_heads_and_frozen_projection_build_the_same_vit_on_both_sides(tmp_path):
    """benchmarks/train_step.py --num-heads / --freeze-patch-projection: both implementations
    build the ViT MoCo v3 trains (the heads change no parameter count; the frozen projection
    leaves the optimizer's count by its kernel and bias)."""
    pytest.importorskip("timm")
    built = {}
    for impl in ("jax", "torch-eager"):
        for options in ((), ("--num-heads", "8", "--freeze-patch-projection")):
            out = tmp_path / f"{impl}{len(options)}.json"
            subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), f"--impl={impl}",
                 "--model", "vit_micro", "--image-size", "16", "--batch", "8", "--steps", "1",
                 f"--json-out={out}", *options],
                check=True, capture_output=True, cwd=ROOT, timeout=600,
                env={**os.environ, "JAX_PLATFORMS": "cpu"})
            built[impl, bool(options)] = json.loads(out.read_text())["architecture"]
    assert built["jax", True] == built["torch-eager", True]
    assert built["jax", False] == built["torch-eager", False]
    assert (built["jax", False]["heads"], built["jax", True]["heads"]) == (4, 8)
    patch_projection = 4 * 4 * 3 * 64 + 64  # 4-px patches, 3 channels, width 64
    assert built["jax", False]["trainable_parameters"] - \
        built["jax", True]["trainable_parameters"] == patch_projection
