"""Cloud TPU slices: how many JAX devices an accelerator type has, and how to split a batch.

The paper trains at batch 4096 (Appendix A, 512 TPU v3 cores). On a smaller slice the same
global batch either fits per device or is reached with gradient accumulation (Appendix G.2).
BatchNorm statistics here are global over each (micro-)batch, so what matters for BatchNorm is
the micro-batch size, not the per-device size: Table 16 shows BYOL holding up down to batch 256
and degrading below (69.6 at 128, 59.7 at 64).
"""

import dataclasses
import logging
import re

# Table 16: below this many examples per BatchNorm batch, accuracy drops.
MIN_BATCHNORM_BATCH = 256

# JAX devices per chip (v4 and v5p chips are one "megacore" device of two TensorCores; v2/v3
# expose each core). Accelerator type names count TensorCores for v2-v4/v5p, chips for v5e/v6e.
_CORES_PER_DEVICE = {"v2": 1, "v3": 1, "v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}


def devices_in_slice(accelerator_type: str) -> int:
    """``"v3-32"`` -> 32, ``"v4-64"`` -> 32, ``"v5litepod-16"`` -> 16."""
    match = re.fullmatch(r"(v\d+[a-z]*(?:pod)?)-(\d+)", accelerator_type)
    if not match or match.group(1) not in _CORES_PER_DEVICE:
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}; expected e.g. "
                         f"v3-8, v4-64, v5litepod-16 (families {sorted(_CORES_PER_DEVICE)})")
    return int(match.group(2)) // _CORES_PER_DEVICE[match.group(1)]


def hosts_in_slice(accelerator_type: str) -> int:
    """Worker VMs of a slice: 8 cores per host on v2/v3, 4 chips per host on v4/v5p and on
    multi-host v5e/v6e slices (v5e/v6e slices of up to 8 chips are one host)."""
    devices = devices_in_slice(accelerator_type)
    family = accelerator_type.split("-")[0]
    if family in ("v2", "v3"):
        return max(1, devices // 8)
    if family in ("v5litepod", "v5e", "v6e") and devices <= 8:
        return 1
    return max(1, devices // 4)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    num_devices: int
    accumulation_steps: int

    @property
    def micro_batch(self) -> int:
        return self.global_batch // self.accumulation_steps

    @property
    def per_device_batch(self) -> int:
        return self.micro_batch // self.num_devices


def plan_batch(global_batch: int, num_devices: int, max_per_device_batch: int) -> BatchPlan:
    """The fewest accumulation steps that keep every device at <= ``max_per_device_batch``.

    Raises if the global batch cannot be split evenly; logs a warning when the micro-batch that
    BatchNorm sees falls below 256 (Table 16).
    """
    for steps in range(1, global_batch + 1):
        if global_batch % steps or (global_batch // steps) % num_devices:
            continue
        plan = BatchPlan(global_batch, num_devices, steps)
        if plan.per_device_batch <= max_per_device_batch:
            if plan.micro_batch < MIN_BATCHNORM_BATCH:
                logging.warning(
                    "BatchNorm batch of %d (global %d / %d accumulation steps) is below %d: "
                    "Table 16 reports degraded accuracy", plan.micro_batch, global_batch, steps,
                    MIN_BATCHNORM_BATCH)
            return plan
    raise ValueError(f"batch {global_batch} cannot be split evenly over {num_devices} devices "
                     f"with at most {max_per_device_batch} examples per device")
