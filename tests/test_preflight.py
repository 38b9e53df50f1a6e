"""The pre-flight (``byol-launch preflight``): byol-train's step compiled for a TPU slice with
libtpu on this CPU machine (the ``tpu`` extra), its memory and FLOPs those of the compiler,
a step that cannot fit refused with the per-chip batch that does."""

import importlib.util
import json
import signal
import subprocess

import pytest

from byol_flax.cloud import launch, preflight, tpu_compile

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the tpu extra) is not installed")
SMOKE = "digits_cpu:smoke=True"


@pytest.fixture(autouse=True)
def compile_in_this_process(monkeypatch):
    """The command compiles in a child process; here in the test's own, so that the tests can
    change its tables (a chip's HBM) and read its output."""
    monkeypatch.setenv("BYOL_FLAX_PREFLIGHT_CHILD", "1")


@pytest.mark.parametrize("accelerator, topology", [
    ("v4-8", "v4:2x2x1"), ("v4-32", "v4:2x2x4"), ("v4-64", "v4:2x4x4"), ("v4-128", "v4:4x4x4"),
    ("v5p-256", "v5p:4x4x8"), ("v5litepod-16", "v5e:4x4"), ("v5litepod-256", "v5e:16x16"),
    ("v6e-8", "v6e:2x4"), ("v3-32", "v3:4x4")])
def test_a_slice_names_the_topology_cloud_tpu_gives_it(accelerator, topology):
    assert preflight.topology_name(accelerator) == topology


HLO = """
  %all-reduce.1 = (f32[64]{0}, f32[128,2]{1,0}) all-reduce(f32[64]{0} %a, f32[128,2]{1,0} %b)
  %all-reduce-start.2 = bf16[10]{0} all-reduce-start(bf16[10]{0} %c), replica_groups={}
  %all-reduce-done.2 = bf16[10]{0} all-reduce-done(bf16[10]{0} %all-reduce-start.2)
  %convolution.3 = bf16[8,4,4,16]{3,2,1,0} convolution(bf16[8,8,8,3] %x, bf16[3,3,3,16] %w)
  %dot.4 = f32[8,10]{1,0} dot(f32[8,16]{1,0} %y, f32[16,10]{1,0} %z)
  %fusion.5 = bf16[4,197,64]{2,1,0:T(8,128)(2,1)} fusion(%p), kind=kLoop, calls=%f
  %fusion.6 = f32[4,197,197]{2,1,0:T(8,128)} fusion(%q), kind=kLoop, calls=%g
  %convolution.7 = f32[4,197,197]{2,1,0} convolution(%fusion.5, %fusion.5), dim_labels=0bf_
  ROOT %convolution.8 = f32[4,197,64]{2,1,0} convolution(%fusion.6, %fusion.5), window={}
"""


def test_the_hlo_reader_counts_collectives_their_bytes_and_compute_dtypes():
    collectives, dots = tpu_compile.read_hlo(HLO)
    assert collectives == {"all-reduce": {"count": 2, "bytes": 64 * 4 + 256 * 4 + 10 * 2}}
    # By their inputs' dtypes (an optimised module's operands are looked up by name); the
    # result's when it differs: bfloat16 accumulated in float32, or a mixed-dtype product.
    assert dots == {"convolution bf16": 1, "dot f32": 1, "convolution bf16->f32": 1,
                    "convolution bf16+f32->f32": 1}


def test_overrides_change_the_config_as_they_would_change_byol_trains():
    config = preflight.load_config(SMOKE, ["--config.training.batch_size=64"])
    assert config.training.batch_size == 64
    with pytest.raises(preflight.PreflightError, match="linaer"):
        preflight.load_config(SMOKE, ["--config.linaer.epochs=1"])


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
    ("TPU v3", 61.5), ("NVIDIA H100 80GB HBM3", 989.0), ("Unknown chip", None)])
def test_each_device_kind_has_its_own_peak_the_longest_prefix_winning(kind, peak):
    assert preflight.peak_tflops(kind) == peak  # vendor data sheets, dense bfloat16


def test_an_epoch_at_an_assumed_mfu_is_the_flops_over_the_slices_peak():
    # ResNet-50's 64.5 GFLOP per image over ImageNet on 32 v4 chips at 40%: 23.5 s.
    seconds = preflight.epoch_seconds(64.5e9, 1_281_167, 32, 275.0, 0.4)
    assert seconds == pytest.approx(64.5e9 * 1_281_167 / (32 * 275e12 * 0.4))
    assert 23 < seconds < 24


@pytest.mark.parametrize("spec, key", [
    ("eval_imagenet:linear", "linear.batch_size"),  # frozen encoder and heads on device
    ("eval_digits:linear", "feature_batch_size"),  # a linear layer on extracted features
    ("eval_imagenet:semi_1pct", "semi_supervised.batch_size"),
    ("eval_transfer:finetune", "transfer_finetune.batch_size"),
    ("eval_imagenet:knn", "feature_batch_size")])
def test_each_protocol_names_the_batch_its_compiled_step_holds(spec, key):
    assert tpu_compile.protocol_batch_key(preflight.load_config(spec)) == key


def test_a_gpu_accelerator_is_refused_in_one_line(capsys):
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=H100:8"]) == 2
    assert "compiles for TPU slices" in capsys.readouterr().err


def test_a_compiler_crash_in_the_child_process_is_one_line(capsys, monkeypatch):
    """The compile runs in a child process (libtpu can die of a segmentation fault, which no
    Python code survives): its death by a signal is one line naming the slice."""
    monkeypatch.delenv("BYOL_FLAX_PREFLIGHT_CHILD", raising=False)
    started = []

    def crashed(command, **kwargs):
        started.append(command)
        return subprocess.CompletedProcess(command, -signal.SIGSEGV, stdout="")

    monkeypatch.setattr(subprocess, "run", crashed)
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v6e-64"]) == 1
    assert started[0][1:4] == ["-m", "byol_flax.cloud.launch", "preflight"]
    assert f"--config={SMOKE}" in started[0] and "--accelerator=tpu-v6e-64" in started[0]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: PreflightError: libtpu crashed (SIGSEGV) compiling for "
                           "v6e-64")


@needs_libtpu
@pytest.mark.slow  # ~80 s: five libtpu compiles of the smoke model
def test_the_smoke_step_compiles_for_a_v4_8_and_an_impossible_fit_names_the_batch(
        capsys, monkeypatch):
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v4-8",
                        "--override=--config.training.num_train_examples=1000",
                        "--eval_config=eval_digits:semi_supervised,smoke=True"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["fits"] and report["devices"] == 4 and report["per_chip_batch"] == 8
    # The fine-tuning protocol's step on the same encoder: its own batch, its own figures.
    tuned = report["protocols"]["eval_digits:semi_supervised,smoke=True"]
    assert tuned["fits"] and tuned["batch_key"] == "semi_supervised.batch_size"
    assert tuned["per_chip_batch"] == tuned["global_batch"] // 4
    assert 0 < tuned["per_chip_bytes"] < report["hbm_bytes"]
    assert tuned["collectives"]["all-reduce"]["count"] > 0  # its gradients over the chips
    assert 0 < report["per_chip_bytes"] < report["hbm_bytes"] == 32 * preflight.GiB
    assert report["flops_per_image"] > 0
    # An epoch of the config's 1000 images at the assumed MFUs, from the compiled FLOPs.
    assert report["epoch_seconds_at_mfu"]["0.4"] == pytest.approx(
        report["flops_per_image"] * 1000 / (4 * 275e12 * 0.4), rel=1e-3)
    assert any("an epoch of 1000 images" in line for line in lines[:-1])
    assert report["collectives"]["all-reduce"]["count"] > 0  # gradients, BatchNorm statistics
    assert any("fits" in line for line in lines[:-1])

    # Accumulation runs the network in a loop, whose body XLA's cost analysis counts once:
    # scaled by the trip count, the FLOPs per image are those of one pass over the batch (an
    # upper bound: the augmentation and update outside the loop are scaled too, a larger
    # share of this tiny model's step than of a ResNet-50's, where it is 0.5%).
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v4-8",
                        "--override=--config.training.accumulation_steps=2"]) == 0
    accumulated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert accumulated["per_chip_batch"] == 4
    assert 1.0 <= accumulated["flops_per_image"] / report["flops_per_image"] < 1.2

    # Twice the batch against a chip that holds just the first one (no headroom): the batch
    # that fits is named from the compiler's figures at the two batches.
    monkeypatch.setitem(preflight.HBM_BYTES, "v4", report["per_chip_bytes"] + 1)
    monkeypatch.setattr(preflight, "FIT_HEADROOM", 0.0)
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v4-8",
                        "--override=--config.training.batch_size=64"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    small = json.loads(lines[-1])
    assert not small["fits"] and small["per_chip_batch"] == 16
    assert small["per_chip_bytes"] > report["per_chip_bytes"]  # twice the batch, more memory
    most = small["max_per_chip_batch"]
    assert most == 8
    assert any(f"largest per-chip batch that fits is about {most}" in line for line in lines)


@needs_libtpu
@pytest.mark.slow  # ~25 s: one compile over two slices
def test_a_multi_slice_run_compiles_over_every_slices_devices(capsys):
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v4-8",
                        "--num_slices=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_slices"] == 2 and report["devices"] == 8 and report["fits"]
    assert report["per_chip_batch"] == report["global_batch"] // 8
    assert report["collectives"]  # the gradients cross the slices


@needs_libtpu
@pytest.mark.slow  # ~70 s: a compile libtpu refuses (out of HBM) and one at half the batch
def test_a_step_the_compiler_refuses_for_lack_of_hbm_is_one_report_naming_the_batch(capsys):
    assert launch.main(["preflight", f"--config={SMOKE}", "--accelerator=tpu-v4-8",
                        "--override=--config.data.image_size=224",
                        "--override=--config.training.batch_size=4096"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["compiler_refused"] and not report["fits"]
    assert report["temp_bytes"] > report["usable_bytes"] > 0  # the compiler's own figures
    assert 0 < report["max_per_chip_batch"] < report["per_chip_batch"] == 1024
    assert "the compiler refused it" in lines[1] and "Traceback" not in "\n".join(lines)


@needs_libtpu
def test_the_tpu_compiler_keeps_the_finiteness_checks_multiply_by_zero():
    """``train_step.state_is_finite`` sums x * 0 (0 for finite x, NaN otherwise): a compiler
    that folded x * 0 to 0 would make it always true. libtpu keeps the product."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from byol_flax.train_step import state_is_finite

    class Arrays(nnx.Module):  # state_is_finite reads any module's arrays
        def __init__(self):
            self.weights = nnx.Param(jnp.zeros((256, 256)))

    device = SingleDeviceSharding(preflight.tpu_devices("v5litepod-8")[0])
    graphdef, state = nnx.split(Arrays())
    check = jax.jit(lambda state: state_is_finite(nnx.merge(graphdef, state)),
                    in_shardings=device, out_shardings=device)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            state)
    hlo = check.lower(abstract).compile().as_text()
    assert "multiply" in hlo and "is-finite" in hlo, hlo
