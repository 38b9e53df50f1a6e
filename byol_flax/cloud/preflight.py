"""Pre-flight: byol-train's step compiled for a TPU slice on this machine, before the slice is
paid for.

``jax[tpu]`` brings libtpu, whose compiler runs without a TPU: ``jax.experimental.topologies``
describes the slice's devices (one per chip on v4/v5p, as a real slice shows them), the step is
built exactly as ``byol-train`` builds it for the config (the same mesh over every device, the
state replicated, the batch sharded over ``data``, the config's dtypes, accumulation and
donation), lowered with abstract arrays (nothing is allocated, whatever the model's size) and
compiled. What the compiler reports is what this prints: per-chip memory against the chip's
HBM, FLOPs, the collectives of the program and the dtypes its convolutions and matmuls run in.
When the step does not fit, a second compile at half the per-chip batch gives memory as a
function of the batch, and so the largest per-chip batch that fits.
"""

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from byol_flax.cloud.slices import devices_in_slice
from byol_flax.errors import UserError
from byol_flax.storage import files

GiB = 1 << 30
# HBM per JAX device (a chip; a TensorCore on v2/v3), from Google's TPU system architecture pages.
HBM_BYTES = {"v2": 8 * GiB, "v3": 16 * GiB, "v4": 32 * GiB, "v5p": 95 * GiB,
             "v5litepod": 16 * GiB, "v5e": 16 * GiB, "v6e": 32 * GiB}
# Dense bfloat16 peak TFLOP/s per JAX device, by ``device_kind`` prefix (vendor data sheets).
# A TPU v2/v3 JAX device is one TensorCore (half a chip); v4 and later present one per chip.
PEAK_TFLOPS = {
    "TPU v2": 22.5, "TPU v3": 61.5, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0,
    "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0,
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0, "NVIDIA V100": 125.0, "Tesla V100": 125.0,
}
# Model FLOPs utilisations the epoch-time estimates are stated at: assumptions, since no
# measured TPU time exists (XLA's TPU cost model gives none on a CPU).
ASSUMED_MFU = (0.3, 0.4, 0.5)
# The compiler's name of each family, and the chip configuration of a real slice: v4/v5p chips
# are one "megacore" device of two TensorCores.
_TOPOLOGY_FAMILY = {"v2": "v2", "v3": "v3", "v4": "v4", "v5p": "v5p", "v5litepod": "v5e",
                    "v5e": "v5e", "v6e": "v6e"}
_MEGACORE = ("v4", "v5p")
# Headroom kept free when sizing the largest batch that fits (the runtime's own buffers).
FIT_HEADROOM = 0.05
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


class PreflightError(UserError, ValueError):
    """A slice or config the pre-flight cannot compile for; the message says which."""


def peak_tflops(device_kind: str) -> float | None:
    """The dense bfloat16 peak of one JAX device of ``device_kind`` (longest prefix wins)."""
    for prefix, value in sorted(PEAK_TFLOPS.items(), key=lambda item: -len(item[0])):
        if device_kind.startswith(prefix):
            return value
    return None


def epoch_seconds(flops_per_image: float, images: int, devices: int, peak: float,
                  mfu: float) -> float:
    """One epoch of ``images`` on ``devices`` of ``peak`` TFLOP/s each at utilisation ``mfu``."""
    return flops_per_image * images / (devices * peak * 1e12 * mfu)


def _family(accelerator_type: str) -> str:
    return accelerator_type.split("-")[0]


def topology_name(accelerator_type: str) -> str:
    """libtpu's topology of a slice: ``v4-64`` (32 chips) -> ``v4:2x4x4``, ``v5litepod-16`` ->
    ``v5e:4x4``, ``v3-32`` (16 chips) -> ``v3:4x4``; the shapes Cloud TPU gives each size."""
    family = _family(accelerator_type)
    devices = devices_in_slice(accelerator_type)
    chips = devices // 2 if family in ("v2", "v3") else devices
    if family in _MEGACORE:  # 3-D: 2x2x1 (one host), 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ...
        shape = [2, 2, 1]
        while math.prod(shape) < chips:
            smallest = min(shape)
            shape[max(i for i, n in enumerate(shape) if n == smallest)] *= 2
    else:  # 2-D
        shape = [1, 1]
        while math.prod(shape) < chips:
            shape[0 if shape[0] <= shape[1] else 1] *= 2
        shape = sorted(shape)
    if math.prod(shape) != chips:
        raise PreflightError(f"--accelerator={accelerator_type}: {chips} chips is not a slice "
                             "shape this pre-flight knows")
    return f"{_TOPOLOGY_FAMILY[family]}:{'x'.join(map(str, shape))}"


@contextlib.contextmanager
def _native_stderr_to_log() -> Iterator[None]:
    """libtpu, started without a TPU, writes its notices (no accelerator type, no worker
    hostnames: true and harmless for a compile) straight to file descriptor 2: they go to the
    log instead of burying the report."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            logging.info("libtpu at start-up: %s", sink.read().decode(errors="replace"))


def tpu_devices(accelerator_type: str, num_slices: int = 1) -> list[Any]:
    """The abstract devices of ``num_slices`` slices of ``accelerator_type`` (libtpu's)."""
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - part of jax
        raise PreflightError(str(error)) from error
    family = _family(accelerator_type)
    # libtpu locks /tmp/libtpu_lockfile so that one process drives a host's chips; a compile
    # drives none, and two pre-flights on one machine would otherwise refuse each other.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _native_stderr_to_log():
            topology = topologies.get_topology_desc(
                topology_name=topology_name(accelerator_type), platform="tpu",
                chip_config_name="megacore" if family in _MEGACORE else "default",
                **({"num_slices": num_slices} if num_slices > 1 else {}))
    except Exception as error:
        if importlib.util.find_spec("libtpu") is None:
            raise PreflightError(
                "the pre-flight compiles with libtpu, which is not installed: pip install -c "
                "constraints.txt '.[tpu]'") from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise PreflightError(f"libtpu cannot describe {accelerator_type}: {first_line}") \
            from error
    return list(topology.devices)


@dataclasses.dataclass
class Compiled:
    """What the compiler says about one compile of the step."""

    per_chip_batch: int  # the micro-batch one chip holds at once (accumulation splits the batch)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float | None
    collectives: dict[str, dict[str, int]]
    dot_dtypes: dict[str, int]
    seconds: float
    # The compiler refused the program: its temporaries need more than it can use of a chip's
    # HBM (``usable_bytes``, which it names); ``temp_bytes`` is then what they need.
    out_of_memory: bool = False
    usable_bytes: int | None = None
    hlo: str = dataclasses.field(default="", repr=False)  # the optimised module's text

    @property
    def per_chip_bytes(self) -> int:
        """What one chip holds while the step runs: its arguments (the donated state is reused
        for the output), the outputs that are not aliased, temporaries and the program."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


_OUT_OF_MEMORY = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(error: Exception) -> tuple[int, int] | None:
    """(bytes the temporaries need, bytes available) of the TPU compiler's out-of-memory error
    ("the total memory required for HLO temporaries (99.80G) exceeds available HBM (30.75G)")."""
    match = _OUT_OF_MEMORY.search(str(error))
    if not match:
        return None
    return (int(float(match[1]) * _UNITS[match[2]]), int(float(match[3]) * _UNITS[match[4]]))


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _SHAPE.findall(text))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")


def read_hlo(hlo: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(collectives by kind: count and bytes of their results; convolutions and dots by their
    operands' dtypes, e.g. ``"convolution bf16"``, with ``->f32`` when the result differs:
    bfloat16 inputs accumulated in float32, as the MXU does anyway) in an HLO module's text.
    Optimised modules name their operands without types; each is looked up by name."""
    collectives: dict[str, dict[str, int]] = {}
    dots: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, result, op, rest = match.groups()
        result_dtype = _SHAPE.search(result)
        if result_dtype:
            dtypes[name] = result_dtype.group(1)
        op = op.removesuffix("-start")
        if op in ("convolution", "dot"):
            operands = re.findall(r"(?:(" + "|".join(_BYTES) + r")\[[\d,]*\]\S*\s+)?%([\w.\-]+)",
                                  rest.split(")", 1)[0])
            inputs = sorted({typed or dtypes.get(operand, "?") for typed, operand in operands})
            key = f"{op} {'+'.join(inputs)}"
            if result_dtype and inputs != [result_dtype.group(1)]:
                key += f"->{result_dtype.group(1)}"
            dots[key] = dots.get(key, 0) + 1
        elif op in COLLECTIVES:
            entry = collectives.setdefault(op, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += _shape_bytes(result)
    return collectives, dots


def _num_classes(config: ml_collections.ConfigDict) -> int:
    if not config.model.online_classifier:
        return 0
    return int(config.data.get("num_classes", 0) or 1000)


def _per_device_bytes(arguments: Any, devices: int) -> int:
    """What ``arguments`` (abstract, with shardings) put on one device: a replicated array
    whole, an array split over the mesh one share."""
    import jax

    return sum(x.size * x.dtype.itemsize // (devices if x.sharding.spec else 1)
               for x in jax.tree.leaves(arguments))


def _compile(lower: Callable[[], Any], arguments: Any, per_chip_batch: int,
             devices: int) -> Compiled:
    """``lower()`` (a ``jit(...).lower(...)`` of ``arguments``) compiled by libtpu and what the
    compiler says of it; a program it refuses for lack of HBM is a :class:`Compiled` with
    ``out_of_memory`` and its figures."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    started = time.perf_counter()
    # A compile-only TPU client cannot load executables: keep them out of (and do not read
    # them from) a persistent compilation cache the process may use. JAX decides once per
    # process whether the cache is used: reset before and after so that the switch holds here
    # and the process's own setting holds again for its later compiles.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        compiled = lower().compile()
    except Exception as error:
        needed = _out_of_memory(error)
        if needed is None:
            raise
        return Compiled(per_chip_batch=per_chip_batch,
                        argument_bytes=_per_device_bytes(arguments, devices), output_bytes=0,
                        alias_bytes=0, temp_bytes=needed[0], code_bytes=0, flops=None,
                        collectives={}, dot_dtypes={}, out_of_memory=True,
                        usable_bytes=needed[1], seconds=time.perf_counter() - started)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    collectives, dots = read_hlo(hlo)
    return Compiled(
        per_chip_batch=per_chip_batch, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        flops=cost.get("flops"), collectives=collectives, dot_dtypes=dots, seconds=seconds,
        hlo=hlo)


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Compiled:
    """Builds byol-train's step for ``config`` over ``devices`` and compiles it, abstractly."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from byol_flax.sharding import data_sharding, make_mesh, replicated_sharding
    from byol_flax.train_state import create_train_state
    from byol_flax.train_step import StepOptions, make_train_step

    mesh = make_mesh(devices)
    # The schedules' lengths are constants of the program: any run length compiles the same.
    options = StepOptions.from_config(config, total_steps=1000, warmup_steps=100)
    num_classes = _num_classes(config)
    abstract = create_train_state(config, options.learning_rate, num_classes=num_classes,
                                  abstract=True)
    graphdef, state = nnx.split(abstract)
    state = _abstract(state, replicated_sharding(mesh))
    size, batch = config.data.image_size, config.training.batch_size
    views = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=data_sharding(mesh))
    inputs = {"view1": views, "view2": views}
    if num_classes:
        inputs["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding(mesh))
    step = make_train_step(graphdef, mesh, options)
    return _compile(lambda: step.lower(state, inputs), (state, inputs),
                    batch // config.training.accumulation_steps // len(devices), len(devices))


# The config section whose ``batch_size`` a protocol's on-device step holds; protocols on
# extracted features hold ``feature_batch_size`` images (the encoder's forward pass).
PROTOCOL_BATCH = {"linear": "linear", "semi_supervised": "semi_supervised",
                  "transfer_finetune": "transfer_finetune"}


def protocol_batch_key(eval_config: ml_collections.ConfigDict) -> str:
    """The dotted key of the batch the protocol's compiled step holds on device."""
    section = PROTOCOL_BATCH.get(eval_config.protocol)
    if section == "linear" and eval_config.linear.augment == "none":
        section = None  # a linear layer fitted on features extracted once
    return f"{section}.batch_size" if section else "feature_batch_size"


def compile_protocol(train_config: ml_collections.ConfigDict,
                     eval_config: ml_collections.ConfigDict,
                     devices: Sequence[Any]) -> Compiled:
    """The on-device step of ``eval_config``'s protocol on the encoder ``train_config``
    pre-trains, compiled abstractly over ``devices``: the linear protocol's step (frozen
    encoder, the grid of heads), fine-tuning's (the whole classifier), or the forward pass that
    extracts features (kNN, linear on features, transfer linear)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from byol_flax.evaluation import classifier as clf
    from byol_flax.evaluation import heads as heads_lib
    from byol_flax.evaluation import linear
    from byol_flax.models.byol import build_encoder_from_config
    from byol_flax.sharding import data_sharding, make_mesh, replicated_sharding

    mesh = make_mesh(devices)
    replicated, split = replicated_sharding(mesh), data_sharding(mesh)
    key = protocol_batch_key(eval_config)
    section = key.rpartition(".")[0]
    batch = _dotted(eval_config, key)
    size, classes = eval_config.data.image_size, eval_config.data.num_classes
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=split)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)
    rng = _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    def build() -> nnx.Module:  # its random generator inside the abstract trace
        return build_encoder_from_config(train_config.model, rngs=nnx.Rngs(0))

    per_chip = batch // len(devices)
    if section in ("semi_supervised", "transfer_finetune"):
        model = nnx.eval_shape(lambda: clf.Classifier(build(), classes, seed=0))
        model.train()
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        spec = clf.sgd_spec(eval_config[section], 1000)
        opt_state = jax.eval_shape(spec.build(0.0).init, trainable)
        trainable, frozen, opt_state = _abstract((trainable, frozen, opt_state), replicated)
        hparams = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated)
        arguments = (trainable, frozen, opt_state, images, labels, rng, hparams)
        return _compile(lambda: clf._classifier_step.lower(
            *arguments, graphdef=graphdef, spec=spec, augment=None, tclip=(0.0, 0.0)),
            arguments, per_chip, len(devices))
    encoder = nnx.eval_shape(build)
    encoder.eval()
    graphdef, encoder_state = nnx.split(encoder)
    encoder_state = _abstract(encoder_state, replicated)
    if section == "linear":
        cfg = eval_config.linear
        spec = clf.sgd_spec(cfg, 1000)
        rates = len(cfg.learning_rates)
        heads = jax.eval_shape(lambda: heads_lib.zero_heads(rates, encoder.num_features,
                                                            classes))
        opt_state = jax.eval_shape(functools.partial(heads_lib.init_opt_state, spec), heads)
        heads, opt_state = _abstract((heads, opt_state), replicated)
        augment = linear.device_augment(eval_config)
        tclip = (cfg.tclip_alpha, cfg.tclip_beta) if cfg.tclip else (0.0, 0.0)
        learning_rates = jax.ShapeDtypeStruct((rates,), jnp.float32, sharding=replicated)
        arguments = (heads, opt_state, encoder_state, images, labels, rng, learning_rates)
        return _compile(lambda: heads_lib._heads_step.lower(
            *arguments, graphdef=graphdef, spec=spec, augment=augment, tclip=tclip),
            arguments, per_chip, len(devices))
    arguments = (encoder_state, images)
    return _compile(lambda: clf._inference.lower(*arguments, graphdef=graphdef), arguments,
                    per_chip, len(devices))


def _digits(value: float) -> float:
    """Four significant digits: an estimate's precision, however small or large."""
    return float(f"{value:.4g}")


def _dotted(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _with_value(config: ml_collections.ConfigDict, key: str, value: Any
                ) -> ml_collections.ConfigDict:
    from byol_flax.config import set_dotted

    changed = config.copy_and_resolve_references()
    with changed.unlocked():
        set_dotted(changed, key, value, origin="pre-flight")
    return changed


def fit_report(compile_at: Callable[[int], Compiled], batch: int, unit: int, hbm: int
               ) -> tuple[Compiled, dict[str, Any]]:
    """The program at global ``batch`` compiled and set against ``hbm``; when it does not fit,
    compiled again at half the batch (a multiple of ``unit``, the batch's granularity) and the
    largest per-chip batch named from the line through the two."""
    first = compile_at(batch)
    fits = not first.out_of_memory and first.per_chip_bytes <= hbm
    report: dict[str, Any] = {
        "fits": fits, "per_chip_bytes": first.per_chip_bytes, "hbm_bytes": hbm,
        "margin_bytes": hbm - first.per_chip_bytes, "argument_bytes": first.argument_bytes,
        "temp_bytes": first.temp_bytes, "per_chip_batch": first.per_chip_batch,
        "global_batch": batch, "collectives": first.collectives,
        "dot_dtypes": first.dot_dtypes, "compile_seconds": round(first.seconds, 1),
        "compiler_refused": first.out_of_memory, "usable_bytes": first.usable_bytes}
    half = batch // 2
    if not fits and half and half % unit == 0:
        second = compile_at(half)
        per_image = ((first.per_chip_bytes - second.per_chip_bytes)
                     / (first.per_chip_batch - second.per_chip_batch))
        fixed = first.per_chip_bytes - per_image * first.per_chip_batch
        usable = (first.usable_bytes or hbm) * (1 - FIT_HEADROOM) - fixed
        report["bytes_per_image_per_chip"] = round(per_image)
        report["fixed_bytes_per_chip"] = round(fixed)
        report["max_per_chip_batch"] = max(0, int(usable // per_image)) if per_image > 0 else 0
        report["compile_seconds"] = round(first.seconds + second.seconds, 1)
    return first, report


def preflight(config: ml_collections.ConfigDict, accelerator_type: str, *,
              num_slices: int = 1, hlo_out: str | None = None,
              eval_configs: Sequence[tuple[str, ml_collections.ConfigDict]] = ()
              ) -> dict[str, Any]:
    """The step of ``config`` compiled for ``num_slices`` slices of ``accelerator_type``: the
    report :func:`format_report` prints (and its last line, as JSON). ``hlo_out``: a file for
    the compiled module's text (what the TPU would run, for reading by people and tools).
    ``eval_configs`` (name, config): each protocol's on-device step on ``config``'s encoder
    too, reported under ``protocols``; ``fits`` is then whether every program fits."""
    devices = tpu_devices(accelerator_type, num_slices)
    batch, accumulation = config.training.batch_size, config.training.accumulation_steps
    if batch % (accumulation * len(devices)):
        raise PreflightError(f"config.training.batch_size={batch} in {accumulation} "
                             f"accumulation step(s) does not split over the {len(devices)} "
                             f"devices of {num_slices} x {accelerator_type}")
    hbm = HBM_BYTES[_family(accelerator_type)]
    first, fit = fit_report(
        lambda b: compile_step(_with_value(config, "training.batch_size", b), devices),
        batch, accumulation * len(devices), hbm)
    if hlo_out and first.hlo:
        files.write_text(hlo_out, first.hlo, what="compiled HLO")
    # XLA's cost analysis counts a loop's body once: with accumulation the loop is the whole
    # network over one micro-batch, so its trip count scales it. An upper bound: the
    # augmentation before the loop and the update after it are scaled too (ResNet-50 at 224
    # px: 64.8 GFLOP per image with 2 micro-batches against 64.5 in one, docs/performance.md).
    flops = first.flops * accumulation if first.flops else None
    report: dict[str, Any] = {
        "accelerator": accelerator_type, "num_slices": num_slices,
        "topology": topology_name(accelerator_type), "devices": len(devices), **fit,
        "train_step_fits": fit["fits"],
        "accumulation_steps": accumulation, "flops_per_step_per_chip": flops,
        "flops_per_image": (flops * len(devices) / batch if flops else None),
        "warnings": ([f"{n} {kind_dtype.split()[0]}s with float32 inputs in a "
                      f"{config.model.compute_dtype} config ({kind_dtype})"
                      for kind_dtype, n in sorted(first.dot_dtypes.items())
                      if "f32" in kind_dtype.split()[1].partition("->")[0]]
                     if config.model.compute_dtype != "float32" else []),
    }
    peak = peak_tflops(devices[0].device_kind)
    images = config.training.num_train_examples
    if report["flops_per_image"] and peak and images:
        report["epoch_images"] = images
        report["peak_tflops_per_device"] = peak
        report["epoch_seconds_at_mfu"] = {str(mfu): _digits(epoch_seconds(
            report["flops_per_image"], images, len(devices), peak, mfu)) for mfu in ASSUMED_MFU}
        report["run_hours_at_mfu"] = {
            mfu: _digits(seconds * config.training.epochs / 3600)
            for mfu, seconds in report["epoch_seconds_at_mfu"].items()}
    if eval_configs:
        report["protocols"] = {}
    for name, eval_config in eval_configs:
        key = protocol_batch_key(eval_config)
        eval_batch = _dotted(eval_config, key)
        if eval_batch % len(devices):
            raise PreflightError(f"{name}: config.{key}={eval_batch} does not split over the "
                                 f"{len(devices)} devices of {num_slices} x {accelerator_type}")
        _, protocol = fit_report(
            lambda b, c=eval_config, k=key: compile_protocol(
                config, _with_value(c, k, b), devices), eval_batch, len(devices), hbm)
        report["protocols"][name] = {"protocol": eval_config.protocol, "batch_key": key,
                                     **protocol}
        report["fits"] = report["fits"] and protocol["fits"]
    return report


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """``--config=`` and byol-train's ``--config.KEY=VALUE`` flags (as ``--override`` gives
    them; values are Python literals, else strings), the way byol-train would build it."""
    import ast

    from byol_flax.config import set_dotted
    from byol_flax.runtime.config_names import load_config as load

    config = load(spec)
    with config.unlocked():
        for flag in overrides:
            key, sep, text = flag.removeprefix("--").partition("=")
            if not sep or not key.startswith("config."):
                raise PreflightError(f"--override={flag}: expected --config.KEY=VALUE")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
            try:
                set_dotted(config, key.removeprefix("config."), value, origin="--override")
            except KeyError as error:
                raise PreflightError(str(error.args[0])) from None
    return config


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _memory_line(fit: dict[str, Any]) -> str:
    if fit["compiler_refused"]:
        return (f"does NOT fit: the compiler refused it, its temporaries need "
                f"{_gib(fit['temp_bytes'])} of the {_gib(fit['usable_bytes'])} it can use of "
                f"{_gib(fit['hbm_bytes'])} HBM (arguments {_gib(fit['argument_bytes'])})")
    return (f"per-chip memory {_gib(fit['per_chip_bytes'])} (arguments "
            f"{_gib(fit['argument_bytes'])}, temporaries {_gib(fit['temp_bytes'])}) of "
            f"{_gib(fit['hbm_bytes'])} HBM: "
            + (f"fits, {_gib(fit['margin_bytes'])} to spare" if fit["fits"]
               else f"does NOT fit, {_gib(-fit['margin_bytes'])} over"))


def _largest_line(fit: dict[str, Any], remedy: str) -> list[str]:
    if fit["fits"] or "max_per_chip_batch" not in fit:
        return []
    return [f"the largest per-chip batch that fits is about {fit['max_per_chip_batch']} (a "
            f"line through two compiles: {fit['bytes_per_image_per_chip'] / 2**20:.1f} MiB per "
            f"image per chip on top of {_gib(fit['fixed_bytes_per_chip'])}, "
            f"{FIT_HEADROOM:.0%} kept free; the TPU compiler rematerialises under pressure, so "
            f"check it with a pre-flight at that batch): {remedy}"]


def format_report(report: dict[str, Any], config_name: str) -> list[str]:
    """A few lines for people; the caller prints the report itself as the last line."""
    step = {**report, "fits": report["train_step_fits"]}
    lines = [
        f"{config_name} on {report['num_slices']} x {report['accelerator']} "
        f"({report['topology']}, {report['devices']} devices), per-chip batch "
        f"{report['per_chip_batch']} (global {report['global_batch']}, "
        f"{report['accumulation_steps']} accumulation step(s)); compiled by libtpu in "
        f"{report['compile_seconds']} s",
        _memory_line(step),
    ]
    if report["flops_per_image"]:
        lines.append(f"{report['flops_per_image'] / 1e9:.1f} GFLOP per image (two views, the "
                     f"whole step), {report['flops_per_step_per_chip'] / 1e12:.2f} TFLOP per "
                     "step per chip")
    if "epoch_seconds_at_mfu" in report:
        hours = ", ".join(f"{h:.3g}" for h in report["run_hours_at_mfu"].values())
        lines.append(
            f"an epoch of {report['epoch_images']} images at an assumed "
            + ", ".join(f"{float(mfu):.0%}" for mfu in report["epoch_seconds_at_mfu"])
            + " MFU: " + ", ".join(f"{seconds / 60:.3g}" for seconds in
                                   report["epoch_seconds_at_mfu"].values())
            + f" min (the run: {hours} h; {report['peak_tflops_per_device']:.0f} TFLOP/s "
            "bfloat16 peak per chip; no TPU time was measured)")
    if not report["compiler_refused"]:
        lines.append("collectives per step: " + (", ".join(
            f"{kind} x{entry['count']} ({entry['bytes'] / 2**20:.1f} MiB)"
            for kind, entry in sorted(report["collectives"].items())) or "none"))
    if report["dot_dtypes"]:
        lines.append("convolutions and matmuls: " + ", ".join(
            f"{n} {kind}" for kind, n in sorted(report["dot_dtypes"].items())))
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    lines += _largest_line(step, (
        "keep the global batch with gradient accumulation (byol_imagenet's argument: "
        f"slice={report['accelerator']},max_per_device={step.get('max_per_chip_batch')}), or "
        "use more chips"))
    for name, fit in report.get("protocols", {}).items():
        lines += [f"{name} ({fit['protocol']}): per-chip batch {fit['per_chip_batch']} "
                  f"(config.{fit['batch_key']}={fit['global_batch']}); compiled in "
                  f"{fit['compile_seconds']} s", "  " + _memory_line(fit)]
        lines += ["  " + line for line in _largest_line(fit, (
            f"--config.{fit['batch_key']}="
            f"{fit.get('max_per_chip_batch', 0) * report['devices']}, or use more chips"))]
    return lines
