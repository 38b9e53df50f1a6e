"""The correctness side of performance work: the patches convolution equals lax.conv (values
and gradients), the runtime XLA flags, one compilation across steps and a resume with no implicit
host <-> device transfers, bfloat16 compute against float32. Speeds are in benchmarks/."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from byol_flax.models.conv import (
    PATCHES_BELOW,
    conv_auto,
    conv_function,
    conv_via_patches,
    materialise,
)
from byol_flax.models.encoders import build_encoder
from byol_flax.models.init import init_module
from byol_flax.runtime import xla as runtime
from tests.helpers import metrics_by_step
from tests.test_train_driver import SHRINK, data_dir  # noqa: F401 (a fixture)

DN = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("size,kernel,stride,channels_in,channels_out", [
    (8, 3, 1, 4, 5), (8, 3, 2, 4, 5), (7, 3, 2, 3, 6), (2, 3, 1, 8, 8), (1, 3, 1, 8, 4),
    (9, 7, 2, 3, 8), (6, 1, 2, 5, 7), (5, 1, 1, 5, 3), (3, 3, 2, 4, 4),
])
def test_patches_convolution_equals_lax_conv_in_values_and_gradients(
        size, kernel, stride, channels_in, channels_out):
    rng = np.random.default_rng(0)  # numpy: jax.random's programs take seconds to compile
    x = rng.normal(size=(2, size, size, channels_in)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, channels_in, channels_out)).astype(np.float32)
    precision = lax.Precision.HIGHEST
    reference = lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=DN, precision=precision)
    patches = lambda x, w: conv_via_patches(
        x, w, (stride, stride), "SAME", dimension_numbers=lax.conv_dimension_numbers(
            x.shape, w.shape, DN), precision=precision)

    @jax.jit
    def values_and_gradients(x, w, cotangent):
        (y_ref, vjp_ref), (y, vjp) = jax.vjp(reference, x, w), jax.vjp(patches, x, w)
        return (y, *vjp(cotangent)), (y_ref, *vjp_ref(cotangent))

    output_shape = jax.eval_shape(reference, x, w).shape
    cotangent = rng.normal(size=output_shape).astype(np.float32)
    for got, expected in zip(*values_and_gradients(x, w, cotangent)):  # output, d/dx, d/dw
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_patches_convolution_takes_explicit_padding_and_refuses_dilation():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 1))
    np.testing.assert_allclose(conv_via_patches(x, w, (1, 1), [(1, 1), (0, 2)]),
                               lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (0, 2)],
                                                        dimension_numbers=DN))
    with pytest.raises(NotImplementedError, match="dilated"):
        conv_via_patches(x, w, (1, 1), "SAME", rhs_dilation=(2, 2))
    with pytest.raises(NotImplementedError, match="grouped"):
        conv_via_patches(x, w, (1, 1), "SAME", feature_group_count=2)
    with pytest.raises(ValueError, match="'fft'"):
        conv_function("fft")


def test_auto_picks_patches_only_for_small_maps_on_the_cpu(monkeypatch):
    used = []
    monkeypatch.setattr("byol_flax.models.conv.conv_via_patches",
                        lambda *a, **k: used.append("patches"))
    monkeypatch.setattr(lax, "conv_general_dilated", lambda *a, **k: used.append("xla"))
    w = jnp.ones((3, 3, 2, 2))
    small, large = PATCHES_BELOW - 1, PATCHES_BELOW
    conv_auto(jnp.ones((1, small, small, 2)), w, (1, 1), "SAME")
    conv_auto(jnp.ones((1, large, large, 2)), w, (1, 1), "SAME")
    conv_auto(jnp.ones((1, 2 * large - 1, 2 * large - 1, 2)), w, (2, 2), "SAME")  # output: large
    conv_auto(jnp.ones((1, large, large, 2)), w, (2, 2), "SAME")  # output: small
    conv_auto(jnp.ones((1, large + 1, large + 1, 2)), w, (1, 1), "VALID")  # output: small
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    conv_auto(jnp.ones((1, 2, 2, 2)), w, (1, 1), "SAME")
    assert used == ["patches", "xla", "xla", "patches", "patches", "xla"]


@pytest.mark.parametrize("size,kernel,stride", [(8, 3, 1), (8, 3, 2), (7, 1, 2), (8, 1, 2),
                                                (6, 1, 1), (9, 7, 2)])
def test_auto_convolution_on_the_cpu_equals_lax_conv_in_values_and_gradients(size, kernel, stride):
    """The CPU path of "auto" (a materialised input; 1x1 strided layers sliced first) computes
    the same convolution as lax's, forward and both gradients."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, size, size, 4)).astype(np.float32)
    w = rng.normal(size=(kernel, kernel, 4, 5)).astype(np.float32)
    numbers = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    reference = lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=numbers)
    auto = lambda x, w: conv_auto(x, w, (stride, stride), "SAME",
                                  dimension_numbers=numbers)
    cotangent = rng.normal(size=jax.eval_shape(reference, x, w).shape).astype(np.float32)

    @jax.jit
    def values_and_gradients(x, w):
        (y_ref, vjp_ref), (y, vjp) = jax.vjp(reference, x, w), jax.vjp(auto, x, w)
        return (y, *vjp(cotangent)), (y_ref, *vjp_ref(cotangent))

    for got, expected in zip(*values_and_gradients(x, w)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_strided_1x1_convolution_reaches_xla_sliced_and_at_stride_1(monkeypatch):
    """As nnx.Conv calls it (unit dilations spelled out): the input is sliced first."""
    calls = []
    monkeypatch.setattr(lax, "conv_general_dilated",
                        lambda lhs, rhs, strides, *a, **k: calls.append((lhs.shape, strides)))
    for stride in (2, 1):
        conv_auto(jnp.ones((2, 9, 9, 3)), jnp.ones((1, 1, 3, 4)), (stride, stride), "SAME",
                  lhs_dilation=(1, 1), rhs_dilation=(1, 1),
                  dimension_numbers=lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1),
                                                             (0, 3, 1, 2)))
    assert calls == [((2, 5, 5, 3), (1, 1)), ((2, 9, 9, 3), (1, 1))]


def test_materialise_returns_its_input_exactly_and_passes_gradients_through():
    """x / (a runtime 1) must be x bit for bit, whatever the reference element holds, and XLA
    must keep the division (folded away, the input would be fused into transposes again)."""
    # Subnormals aside: XLA:CPU flushes them to zero in every arithmetic op, the convolution's own.
    special = np.array([0.0, -0.0, 1.2e-38, -3.5, np.inf, -np.inf, 3.4e38, 1.0], np.float32)
    x = np.concatenate([special, np.random.default_rng(3).normal(size=8).astype(np.float32)])
    for reference in (np.float32([1.5]), np.float32([np.nan]), np.float32([np.inf]),
                      np.float32([-0.0])):
        got = np.asarray(jax.jit(materialise)(x, reference))
        np.testing.assert_array_equal(got.view(np.uint32), x.view(np.uint32))
        np.testing.assert_array_equal(
            jax.grad(lambda x: jnp.sum(materialise(x, reference) * jnp.arange(16.0)))(x),
            np.arange(16.0))
    nan_in = np.asarray(jax.jit(materialise)(np.float32([np.nan]), np.float32([0.0])))
    assert np.isnan(nan_in).all()
    compiled = jax.jit(materialise).lower(x, np.float32([1.0])).compile().as_text()
    assert "divide(" in compiled


def test_encoder_outputs_and_gradients_do_not_depend_on_the_conv_implementation():
    """Same parameters (same layout), same function: a checkpoint moves between them."""
    images = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    results = {}
    for implementation in ("xla", "patches"):
        encoder = init_module(lambda: build_encoder(  # noqa: B023 - called right here
            "resnet_tiny", stem="small", conv_implementation=implementation, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

        def loss(params):
            return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(images) ** 2)

        with jax.default_matmul_precision("highest"):
            results[implementation] = jax.jit(jax.value_and_grad(loss))(params)
    value, grads = results["patches"]
    np.testing.assert_allclose(value, results["xla"][0], rtol=1e-5)
    # Train-mode BatchNorm divides by batch stds of 4 images: round-off differences of the
    # summation order grow to ~1e-3 of the largest gradient.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3 * np.abs(b).max()),
                 grads, results["xla"][1])


# --- Runtime flags --------------------------------------------------------------------------


def test_xla_flags_are_added_once_and_never_override_the_users(monkeypatch):
    monkeypatch.setattr(runtime.xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setattr(runtime.jaxlib, "__version__", "0.10.2")
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    ours = ["--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
            "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"]
    assert runtime.configure_xla_flags(environ) == ours
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *ours]
    assert runtime.configure_xla_flags(environ) == []  # already there: nothing added twice
    users = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=default"}
    assert runtime.configure_xla_flags(users) == ours[1:]  # the user's value is kept
    assert users["XLA_FLAGS"].split() == ["--xla_cpu_experimental_ynn_fusion_type=default",
                                          *ours[1:]]
    assert runtime.configure_xla_flags({runtime.OPT_OUT: "0"}) == []


def test_xla_flags_are_skipped_for_untested_jaxlib_and_after_backends_start(monkeypatch):
    environ: dict[str, str] = {}
    monkeypatch.setattr(runtime.jaxlib, "__version__", "0.99.0")  # might not know the flag
    monkeypatch.setattr(runtime.xla_bridge, "backends_are_initialized", lambda: False)
    assert runtime.configure_xla_flags(environ) == [] and "XLA_FLAGS" not in environ
    monkeypatch.setattr(runtime.jaxlib, "__version__", "0.10.2")
    monkeypatch.setattr(runtime.xla_bridge, "backends_are_initialized", lambda: True)
    assert runtime.configure_xla_flags(environ) == [] and "XLA_FLAGS" not in environ


def test_the_test_process_runs_with_the_entry_points_flags():
    assert ("--xla_cpu_experimental_ynn_fusion_type" in os.environ["XLA_FLAGS"]) == (
        runtime.jaxlib.__version__.startswith(runtime.TESTED_JAXLIB))


# --- One compilation, no implicit transfers (the real driver, in this process) ----------------


def shrunk_digits_config(data_dir: str):
    """byol_flax/configs/digits_cpu.py with the driver tests' shrink flags (16 steps, batch 16)."""
    from byol_flax.config import set_dotted
    from byol_flax.configs import digits_cpu
    from byol_flax.studies.runner import parse_overrides

    config = digits_cpu.get_config(f"data={data_dir}")
    overrides = parse_overrides([flag.removeprefix("--config.") for flag in SHRINK])
    for key, value in overrides.items():  # Python literals, else strings (as the flags parse)
        set_dotted(config, key, value, origin="SHRINK")
    config.checkpoint.async_save = False
    return config


@pytest.fixture
def one_device(monkeypatch):
    """The driver on one of the tests' 8 CPU devices, as a user's CPU run is (8-way SPMD
    compiles take several times longer)."""
    from byol_flax import sharding, train

    monkeypatch.setattr(train, "make_mesh", lambda: sharding.make_mesh(jax.devices()[:1]))


@pytest.mark.slow  # ~25 s: a run and its resume
def test_step_compiles_once_across_steps_and_a_resume(data_dir, tmp_path, one_device):
    """Also the logging windows, from the same two runs: logged every 4 steps, then resumed
    from step 8 logging every step, so the windows of steps 12 and 16 are compared with the
    per-step values of the same (bitwise resumed) steps."""
    from byol_flax import train

    config = shrunk_digits_config(data_dir)
    config.logging.every_steps = 4
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    train._STEP_CACHE.clear()
    train.train_and_evaluate(config, tmp_path)  # 16 steps, checkpoints at 8, 12, 16
    (step_fn,) = train._STEP_CACHE.values()
    assert step_fn._cache_size() == 1
    windows = metrics_by_step(tmp_path)
    assert list(windows) == [4, 8, 12, 16]
    for newer in ("12", "16"):  # as if preempted after the save of step 8
        for path in sorted((tmp_path / "checkpoints" / newer).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (tmp_path / "checkpoints" / newer).rmdir()
    compiles.clear()
    config.logging.every_steps = 1  # a runtime key
    scalars = train.train_and_evaluate(config, tmp_path)  # restores step 8, trains 9..16
    assert scalars and np.isfinite(scalars["loss"])
    assert train._STEP_CACHE[next(iter(train._STEP_CACHE))] is step_fn
    assert step_fn._cache_size() == 1  # the restored state has the shardings and dtypes it had
    # Set-up programs (initialisers, the evaluation) may compile; the step does not again, and
    # nothing compiles per step: fewer compilations than the 8 steps trained.
    assert len(compiles) < 8, compiles

    # metrics.jsonl: the lines of steps 12 and 16 were dropped on resume and written again.
    per_step = metrics_by_step(tmp_path)
    assert list(per_step) == [4, 8, *range(9, 17)]
    assert per_step[4] == windows[4] and per_step[8] == windows[8]
    for end in (12, 16):
        for key in ("loss", "grad_norm", "collapse/projection_std_ratio"):
            mean = np.mean([per_step[step][key] for step in range(end - 3, end + 1)])
            np.testing.assert_allclose(windows[end][key], mean, rtol=1e-5, err_msg=key)
        # The value at the logging step: schedules, and the effective rank computed from the
        # logging step's batch alone (collapse.with_effective_ranks), not a window average.
        for key in ("learning_rate", "tau", "collapse/projection_effective_rank"):
            assert windows[end][key] == per_step[end][key] != per_step[end - 1][key], key


def test_the_loop_refuses_implicit_transfers_into_the_step(data_dir, tmp_path, monkeypatch,
                                                           one_device):
    """If the loop handed the step host arrays (here: NumPy batches), the step would copy them
    implicitly on every call; the loop's transfer guard makes that an error."""
    from byol_flax import train

    config = shrunk_digits_config(data_dir)
    monkeypatch.setattr(train, "shard_batch", lambda batch, mesh: batch)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device transfer"):
        train.train_and_evaluate(config, tmp_path)


# --- Mixed precision --------------------------------------------------------------------------


def test_accelerator_configs_compute_in_bfloat16_and_smoke_runs_in_float32():
    """The TPU/GPU experiment configs use bfloat16 compute (the parity below is what makes that
    safe); their CPU smoke versions keep float32."""
    from byol_flax.studies.study import load_config

    for name in ("byol_imagenet:r50x1", "byol_imagenet:r200x2", "byol_imagenet_300ep:r50x1",
                 "byol_imagenet_bs512:r50x1", "simclr_imagenet_300ep:r50x1"):
        assert load_config(name).model.compute_dtype == "bfloat16", name
        assert load_config(f"{name},smoke=True").model.compute_dtype == "float32", name


@pytest.mark.slow  # ~30 s: two trainings compared
def test_bfloat16_compute_tracks_float32_losses_and_keeps_float32_parameters(config):
    """bfloat16 activations; float32 parameters, BatchNorm statistics, loss and optimizer."""
    from byol_flax.sharding import shard_batch
    from tests.helpers import make_views
    from tests.test_train_step import setup

    losses = {}
    for dtype in ("float32", "bfloat16"):
        config.model.compute_dtype = dtype
        graphdef, state, step, mesh = setup(config, devices=jax.devices()[:1])
        losses[dtype] = []
        for seed in range(4):
            state, metrics = step(state, shard_batch(make_views(16, seed), mesh))
            losses[dtype].append(float(metrics["loss"]))
        merged = nnx.merge(graphdef, state)
        kept = [nnx.state(merged.online, nnx.Param), nnx.state(merged.online, nnx.BatchStat),
                nnx.state(merged.target), nnx.state(merged.optimizer.opt_state)]
        assert {x.dtype for x in jax.tree.leaves(kept) if jnp.issubdtype(x.dtype, jnp.floating)
                } == {jnp.dtype("float32")}, dtype
    # bfloat16 keeps 8 bits of mantissa: losses (in [-4, 4]) agree to ~1e-2, step by step.
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], atol=3e-2)
    assert losses["float32"][0] != losses["bfloat16"][0]  # bfloat16 really was used


def test_tracing_the_step_does_not_scan_the_trace_for_error_messages(config, monkeypatch):
    """Every Variable write asks a tracer for its sharding; with the fix the AttributeError it
    gets no longer builds the message that scans all equations traced so far."""
    from jax._src.interpreters import partial_eval

    from byol_flax.sharding import shard_batch
    from tests.helpers import make_views
    from tests.test_train_step import setup

    assert runtime.speed_up_tracing()  # idempotent; already applied by byol_flax.train_step
    scans = []
    original = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg",
                        lambda self: scans.append(1) or original(self))
    _, state, step, mesh = setup(config)
    step.trace(state, shard_batch(make_views(16), mesh))
    assert scans == []

    @jax.jit
    def probe(x):
        assert not hasattr(x, "sharding") and getattr(x, "sharding", None) is None
        with pytest.raises(AttributeError, match="'sharding' attribute is not available"):
            x.sharding  # noqa: B018
        return x

    probe(jnp.ones(2))


def test_encoders_without_convolutions_build_with_auto_and_refuse_another_choice():
    """A user-registered encoder need not know about conv implementations (CONTRIBUTING's
    example does not); asking it for a specific one is an error naming the encoder."""
    from byol_flax.models.encoders import ENCODERS

    class NoConvEncoder(nnx.Module):
        def __init__(self, *, width_multiplier, stem, bn, dtype, rngs):
            self.num_features = 3

    ENCODERS.register("no_conv_test_encoder")(NoConvEncoder)
    try:
        encoder = build_encoder("no_conv_test_encoder", rngs=nnx.Rngs(0))
        assert encoder.num_features == 3
        with pytest.raises(ValueError, match="'no_conv_test_encoder' does not take conv_impl"):
            build_encoder("no_conv_test_encoder", conv_implementation="xla", rngs=nnx.Rngs(0))
    finally:
        ENCODERS.unregister("no_conv_test_encoder")
    tiny = build_encoder("resnet_tiny", stem="small", conv_implementation="patches",
                         rngs=nnx.Rngs(0))
    assert tiny.stem_conv.conv_general_dilated is conv_via_patches


# --- The accelerator benchmark ----------------------------------------------------------------


@pytest.mark.slow  # ~30 s: every part of the benchmark
def test_accelerator_benchmark_runs_every_part_at_tiny_size(tmp_path):
    """benchmarks/accelerator.py --tiny on this CPU: the step (compile, images/s, model FLOPs
    utilisation against the measured matmul peak) and the host pipeline (one core, one worker
    per core) are measured and set against each other; the full size waits for an
    accelerator."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "accelerator.json"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # one device, as a chip
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "accelerator.py"), "--tiny",
                           f"--json-out={out}"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["devices"], result["platform"], result["dtype"]) == (1, "cpu", "float32")
    assert (result["peak_source"] == "measured float32 matmul"
            and result["peak_tflops_per_device"] > 0)
    (row,) = result["rows"]
    assert row["per_device_batch"] == 2 and row["compile_seconds"] > 0 and row["step_tflop"] > 0
    assert 0 < row["mfu"] < 1 and row["images_per_second_per_chip"] > 0
    assert np.isfinite(row["loss"])
    (vit_row,) = result["vit"]["rows"]  # the ViT point (vit_micro at tiny size)
    assert vit_row["step_tflop"] > 0 and np.isfinite(vit_row["loss"])
    host = result["host"]
    assert 0 < host["per_core_images_per_second"] and 0 < host["per_host_images_per_second"]
    assert result["host_cores_per_chip"] == pytest.approx(
        row["images_per_second_per_chip"] / host["per_core_images_per_second"], rel=0.05,
        abs=2e-3)
    assert "| 2 |" in done.stdout  # the table people read


def test_release_free_heap_returns_freed_pages_to_the_os():
    """A heap with freed blocks between live ones (what compiling leaves) keeps its pages
    resident until trimmed; glibc-only, elsewhere the call reports that it did nothing."""
    from byol_flax.runtime.memory import _malloc_trim, release_free_heap

    if _malloc_trim() is None:
        assert release_free_heap() is False
        pytest.skip("no malloc_trim in this C library")

    def resident_mib() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    blocks = [bytearray(100_000) for _ in range(3000)]  # under the mmap threshold: on the heap
    for index in range(len(blocks)):
        blocks[index][::4096] = b"\x01" * len(blocks[index][::4096])  # touch every page
    kept = blocks[::10]  # every tenth block stays alive, so the heap cannot shrink from the top
    del blocks
    before = resident_mib()
    assert release_free_heap() is True
    assert before - resident_mib() > 100  # ~270 MB of the 300 MB freed were still resident
    del kept
