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
import importlib.util
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from byol_flax.cloud.slices import devices_in_slice, plan_batch
from byol_flax.cloud.tpu_compile import (
    Compiled,
    compile_protocol,
    compile_step,
    dotted,
    protocol_batch_key,
)
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


def _digits(value: float) -> float:
    """Four significant digits: an estimate's precision, however small or large."""
    return float(f"{value:.4g}")


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
        if fixed < second.argument_bytes:  # steeper than linear (the compiler's figures for
            # programs it refuses): the line from the arguments alone to the smaller compile
            # lies above the curve below it, so the batch it names is on the safe side
            fixed = second.argument_bytes
            per_image = (second.per_chip_bytes - fixed) / second.per_chip_batch
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
        eval_batch = dotted(eval_config, key)
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
    if "max_per_chip_batch" in step and step["max_per_chip_batch"] > 0:
        most = step["max_per_chip_batch"]
        plan = plan_batch(report["global_batch"], report["devices"], most)
        lines += _largest_line(step, (
            "keep the global batch with gradient accumulation (byol_imagenet's argument: "
            f"slice={report['accelerator']},max_per_device={most}: {plan.per_device_batch} per "
            f"chip in {plan.accumulation_steps} accumulation steps), or use more chips"))
    else:
        lines += _largest_line(step, "use more chips")
    for name, fit in report.get("protocols", {}).items():
        lines += [f"{name} ({fit['protocol']}): per-chip batch {fit['per_chip_batch']} "
                  f"(config.{fit['batch_key']}={fit['global_batch']}); compiled in "
                  f"{fit['compile_seconds']} s", "  " + _memory_line(fit)]
        lines += ["  " + line for line in _largest_line(fit, (
            f"--config.{fit['batch_key']}="
            f"{fit.get('max_per_chip_batch', 0) * report['devices']}, or use more chips"))]
    return lines
