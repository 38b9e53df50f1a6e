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
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
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
    try:
        with _native_stderr_to_log():
            topology = topologies.get_topology_desc(
                topology_name=topology_name(accelerator_type), platform="tpu",
                chip_config_name="megacore" if family in _MEGACORE else "default",
                **({"num_slices": num_slices} if num_slices > 1 else {}))
    except Exception as error:
        if "libtpu" in str(error).lower() or "tpu" not in str(error).lower():
            raise PreflightError(
                "the pre-flight compiles with libtpu, which is not installed: pip install -c "
                "constraints.txt '.[tpu]'") from error
        raise PreflightError(f"libtpu cannot describe {accelerator_type}: {error}") from error
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


def read_hlo(hlo: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(collectives by kind: count and bytes of their results; convolution and dot results by
    dtype) in an HLO module's text."""
    collectives: dict[str, dict[str, int]] = {}
    dots: dict[str, int] = {}
    for line in hlo.splitlines():
        match = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES)
                          + r"|convolution|dot)(-start)?\(", line)
        if not match:
            continue
        result, op = match.group(1), match.group(2)
        if op in ("convolution", "dot"):
            dtype = _SHAPE.search(result)
            if dtype:
                dots[f"{op} {dtype.group(1)}"] = dots.get(f"{op} {dtype.group(1)}", 0) + 1
            continue
        entry = collectives.setdefault(op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _shape_bytes(result)
    return collectives, dots


def _num_classes(config: ml_collections.ConfigDict) -> int:
    if not config.model.online_classifier:
        return 0
    return int(config.data.get("num_classes", 0) or 1000)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Compiled:
    """Builds byol-train's step for ``config`` over ``devices`` and compiles it, abstractly."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental.compilation_cache import compilation_cache

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
    replicated = replicated_sharding(mesh)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         state)
    size, batch = config.data.image_size, config.training.batch_size
    views = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=data_sharding(mesh))
    inputs = {"view1": views, "view2": views}
    if num_classes:
        inputs["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding(mesh))
    started = time.perf_counter()
    # A compile-only TPU client cannot load executables: keep them out of (and do not read
    # them from) a persistent compilation cache the process may use. JAX decides once per
    # process whether the cache is used: reset before and after so that the switch holds here
    # and the process's own setting holds again for its later compiles.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    per_chip_batch = batch // config.training.accumulation_steps // len(devices)
    try:
        compiled = make_train_step(graphdef, mesh, options).lower(state, inputs).compile()
    except Exception as error:
        needed = _out_of_memory(error)
        if needed is None:
            raise
        arguments = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(inputs)) // len(devices)
        return Compiled(per_chip_batch=per_chip_batch, argument_bytes=arguments, output_bytes=0,
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


def _digits(value: float) -> float:
    """Four significant digits: an estimate's precision, however small or large."""
    return float(f"{value:.4g}")


def _with_batch(config: ml_collections.ConfigDict, batch: int) -> ml_collections.ConfigDict:
    changed = config.copy_and_resolve_references()
    with changed.unlocked():
        changed.training.batch_size = batch
    return changed


def preflight(config: ml_collections.ConfigDict, accelerator_type: str, *,
              num_slices: int = 1, hlo_out: str | None = None) -> dict[str, Any]:
    """The step of ``config`` compiled for ``num_slices`` slices of ``accelerator_type``: the
    report :func:`format_report` prints (and its last line, as JSON). ``hlo_out``: a file for
    the compiled module's text (what the TPU would run, for reading by people and tools)."""
    devices = tpu_devices(accelerator_type, num_slices)
    batch, accumulation = config.training.batch_size, config.training.accumulation_steps
    if batch % (accumulation * len(devices)):
        raise PreflightError(f"config.training.batch_size={batch} in {accumulation} "
                             f"accumulation step(s) does not split over the {len(devices)} "
                             f"devices of {num_slices} x {accelerator_type}")
    hbm = HBM_BYTES[_family(accelerator_type)]
    first = compile_step(config, devices)
    if hlo_out and first.hlo:
        files.write_text(hlo_out, first.hlo, what="compiled HLO")
    fits = not first.out_of_memory and first.per_chip_bytes <= hbm
    report: dict[str, Any] = {
        "accelerator": accelerator_type, "num_slices": num_slices,
        "topology": topology_name(accelerator_type), "devices": len(devices),
        "fits": fits, "per_chip_bytes": first.per_chip_bytes, "hbm_bytes": hbm,
        "margin_bytes": hbm - first.per_chip_bytes, "argument_bytes": first.argument_bytes,
        "temp_bytes": first.temp_bytes, "per_chip_batch": first.per_chip_batch,
        "global_batch": batch, "accumulation_steps": accumulation,
        "flops_per_step_per_chip": first.flops,
        "flops_per_image": (first.flops * len(devices) / batch if first.flops else None),
        "collectives": first.collectives, "dot_dtypes": first.dot_dtypes,
        "compile_seconds": round(first.seconds, 1),
        "compiler_refused": first.out_of_memory, "usable_bytes": first.usable_bytes,
        "warnings": ([f"{n} float32 {kind}s in a {config.model.compute_dtype} config"
                      for kind_dtype, n in first.dot_dtypes.items()
                      for kind in [kind_dtype.split()[0]] if kind_dtype.endswith("f32")]
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
    if not fits:
        half = batch // 2 if (batch // 2) % (accumulation * len(devices)) == 0 else None
        if half:
            second = compile_step(_with_batch(config, half), devices)
            per_image = ((first.per_chip_bytes - second.per_chip_bytes)
                         / (first.per_chip_batch - second.per_chip_batch))
            fixed = first.per_chip_bytes - per_image * first.per_chip_batch
            usable = (first.usable_bytes or hbm) * (1 - FIT_HEADROOM) - fixed
            report["bytes_per_image_per_chip"] = round(per_image)
            report["fixed_bytes_per_chip"] = round(fixed)
            report["max_per_chip_batch"] = max(0, int(usable // per_image)) if per_image > 0 \
                else 0
            report["compile_seconds"] = round(first.seconds + second.seconds, 1)
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


def format_report(report: dict[str, Any], config_name: str) -> list[str]:
    """A few lines for people; the caller prints the report itself as the last line."""
    lines = [
        f"{config_name} on {report['num_slices']} x {report['accelerator']} "
        f"({report['topology']}, {report['devices']} devices), per-chip batch "
        f"{report['per_chip_batch']} (global {report['global_batch']}, "
        f"{report['accumulation_steps']} accumulation step(s)); compiled by libtpu in "
        f"{report['compile_seconds']} s",
        (f"does NOT fit: the compiler refused it, its temporaries need "
         f"{_gib(report['temp_bytes'])} of the {_gib(report['usable_bytes'])} it can use of "
         f"{_gib(report['hbm_bytes'])} HBM (arguments {_gib(report['argument_bytes'])})"
         if report["compiler_refused"] else
         f"per-chip memory {_gib(report['per_chip_bytes'])} (arguments "
         f"{_gib(report['argument_bytes'])}, temporaries {_gib(report['temp_bytes'])}) of "
         f"{_gib(report['hbm_bytes'])} HBM: "
         + (f"fits, {_gib(report['margin_bytes'])} to spare" if report["fits"]
            else f"does NOT fit, {_gib(-report['margin_bytes'])} over")),
    ]
    if report["flops_per_image"]:
        lines.append(f"{report['flops_per_image'] / 1e9:.1f} GFLOP per image (two views, the "
                     f"whole step), {report['flops_per_step_per_chip'] / 1e12:.2f} TFLOP per "
                     "step per chip")
    if "epoch_seconds_at_mfu" in report:
        lines.append(
            f"an epoch of {report['epoch_images']} images at an assumed "
            + ", ".join(f"{float(mfu):.0%}" for mfu in report["epoch_seconds_at_mfu"])
            + " MFU: " + ", ".join(f"{seconds / 60:.3g}" for seconds in
                                   report["epoch_seconds_at_mfu"].values())
            + f" min (the run: {', '.join(f'{h:.3g}' for h in report['run_hours_at_mfu'].values())}"
            " h; "
            f"{report['peak_tflops_per_device']:.0f} TFLOP/s bfloat16 peak per chip; no TPU "
            "time was measured)")
    if not report["compiler_refused"]:
        lines.append("collectives per step: " + (", ".join(
            f"{kind} x{entry['count']} ({entry['bytes'] / 2**20:.1f} MiB)"
            for kind, entry in sorted(report["collectives"].items())) or "none"))
    if report["dot_dtypes"]:
        lines.append("convolutions and matmuls: " + ", ".join(
            f"{n} {kind}" for kind, n in sorted(report["dot_dtypes"].items())))
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    if not report["fits"] and "max_per_chip_batch" in report:
        most = report["max_per_chip_batch"]
        lines.append(
            f"the largest per-chip batch that fits is about {most} (a line through two "
            f"compiles: {report['bytes_per_image_per_chip'] / 2**20:.1f} MiB per image per "
            f"chip on top of {_gib(report['fixed_bytes_per_chip'])}, {FIT_HEADROOM:.0%} kept "
            "free; the TPU compiler rematerialises under pressure, so check it with a "
            "pre-flight at that batch): keep the global batch with gradient accumulation "
            f"(byol_imagenet's argument: slice={report['accelerator']},max_per_device={most})"
            ", or use more chips")
    return lines
