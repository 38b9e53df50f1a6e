"""``byol-launch ENGINE``: prints the task definition of a BYOL run for an engine that recovers
preempted jobs by itself (:mod:`byol_flax.cloud.tasks`).

    byol-launch skypilot --config=byol_imagenet:r50x1,slice=v4-64 --workdir=gs://BUCKET/run \\
        --accelerator=tpu-v4-64 --repo=https://github.com/OWNER/byol_flax.git > run.sky.yaml
    sky jobs launch run.sky.yaml

    byol-launch xpk --config=byol_imagenet:r50x1,slice=v5p-256 --workdir=gs://BUCKET/run \\
        --accelerator=v5p-256 --cluster=CLUSTER --docker_image=IMAGE

``skypilot`` prints a SkyPilot managed-job YAML (spot by default; SkyPilot recreates a preempted
TPU slice or GPU cluster, installs the project at the pinned commit again and reruns the
training command, which resumes from the newest checkpoint of the gs:// workdir). ``xpk`` prints
the ``xpk workload create`` command of a GKE workload (large slices, multi-slice; its JobSet
restarts up to ``--max_restarts`` times). The commit defaults to the running code's
(:mod:`byol_flax.runtime.code_identity`); a checkout with uncommitted changes is refused unless
``--commit`` names one. Nothing is executed.

    byol-launch preflight --config=byol_imagenet:r50x1,slice=v4-64 --accelerator=tpu-v4-64

``preflight`` compiles the run's training step for the slice with libtpu on this machine (no
TPU needed; the ``tpu`` extra) and prints per-chip memory against the chip's HBM, FLOPs, the
collectives and the compute dtypes, then one JSON line (:mod:`byol_flax.cloud.preflight`).
``--override=--config.KEY=VALUE`` changes the config as it would change byol-train's;
``--num_slices`` compiles for a multi-slice run; ``--eval_config=eval_imagenet:linear`` (repeatable)
compiles that protocol's on-device step on the same encoder too.

The former ``gcloud compute tpus tpu-vm`` actions and their relaunch loop are retired: SkyPilot
creates, sets up, recovers, tails (``sky jobs logs``) and deletes on-demand and spot slices alike,
so there is nothing left that printing gcloud commands adds.
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

from byol_flax.cloud import tasks
from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice
from byol_flax.runtime import commands

ENGINES = ("skypilot", "xpk", "preflight")

# The command's own flags (commands.run_command): importing this module defines no global absl
# flag (its --config is a plain string, not byol_flax.main's config flag).
COMMAND_FLAGS = flags.FlagValues()
_F = COMMAND_FLAGS
_CONFIG = flags.DEFINE_string("config", None, "config of byol-train, e.g. "
                              "byol_imagenet:r50x1,slice=v4-64", flag_values=_F)
_WORKDIR = flags.DEFINE_string("workdir", None, "gs://BUCKET/PATH: checkpoints, logs, lease",
                               flag_values=_F)
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "TPU slice (tpu-v4-64, v5p-256) or GPUs "
                                   "per node (H100:8)", flag_values=_F)
_NAME = flags.DEFINE_string("name", "byol", "job / workload name", flag_values=_F)
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "extra flag of byol-train, e.g. "
    "--override=--config.data.dir=gs://BUCKET/imagenet", flag_values=_F)
_COMMIT = flags.DEFINE_string("commit", None, "git commit to install (skypilot; default: the "
                              "running checkout's, which must have no uncommitted changes)",
                              flag_values=_F)
_ZONE = flags.DEFINE_string("zone", None, "zone (both engines; default: theirs)", flag_values=_F)
# SkyPilot.
_REPO = flags.DEFINE_string("repo", None, "git URL SkyPilot clones at --commit", flag_values=_F)
_NUM_NODES = flags.DEFINE_integer("num_nodes", 1, "GPU nodes (a TPU slice is one node)",
                                  flag_values=_F)
_SPOT = flags.DEFINE_boolean("spot", True, "spot capacity (--nospot: on-demand)", flag_values=_F)
_STRATEGY = flags.DEFINE_enum("recovery_strategy", "FAILOVER", tasks.RECOVERY_STRATEGIES,
                              "SkyPilot job_recovery strategy", flag_values=_F)
_MAX_RESTARTS_ON_ERRORS = flags.DEFINE_integer(
    "max_restarts_on_errors", 3, "restarts after the run itself failed (preemptions are "
    "always recovered)", flag_values=_F)
_CLOUD = flags.DEFINE_string("cloud", "gcp", "SkyPilot cloud ('' lets SkyPilot choose)",
                             flag_values=_F)
_REGION = flags.DEFINE_string("region", None, "SkyPilot region", flag_values=_F)
_RUNTIME_VERSION = flags.DEFINE_string("runtime_version", None, "TPU VM image (default: by chip "
                                       "family)", flag_values=_F)
# xpk.
_CLUSTER = flags.DEFINE_string("cluster", None, "xpk GKE cluster", flag_values=_F)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (xpk multi-slice)",
                                   flag_values=_F)
_MAX_RESTARTS = flags.DEFINE_integer("max_restarts", 10, "JobSet restarts (xpk)", flag_values=_F)
_DOCKER_IMAGE = flags.DEFINE_string("docker_image", None, "image with byol_flax installed (xpk; "
                                    "default: the checkout copied into --base_docker_image)",
                                    flag_values=_F)
_BASE_DOCKER_IMAGE = flags.DEFINE_string("base_docker_image", tasks.BASE_DOCKER_IMAGE,
                                         "xpk base image", flag_values=_F)
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (xpk)", flag_values=_F)
# Pre-flight.
_HLO_OUT = flags.DEFINE_string("hlo_out", None, "file for the compiled step's HLO text "
                               "(preflight)", flag_values=_F)
_PREFLIGHT_CHILD = "BYOL_FLAX_PREFLIGHT_CHILD"  # set in the process that compiles
_EVAL_CONFIG = flags.DEFINE_multi_string(
    "eval_config", [], "evaluation config whose on-device step is compiled too, on the "
    "config's encoder (preflight), e.g. eval_imagenet:linear", flag_values=_F)

# Line breaks and other control characters (C0, DEL, C1): in a task definition a newline ends
# the YAML value or shell line it is in, and what follows becomes a key or a command of its own.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
COMMON = ("config", "workdir", "accelerator", "name", "override", "zone")
ENGINE_FLAGS = {
    "skypilot": COMMON + ("commit", "repo", "num_nodes", "spot", "recovery_strategy",
                          "max_restarts_on_errors", "cloud", "region", "runtime_version"),
    "xpk": COMMON + ("cluster", "num_slices", "max_restarts", "docker_image",
                     "base_docker_image", "project"),
}
ENGINE_FLAGS["preflight"] = ("config", "accelerator", "override", "num_slices", "hlo_out",
                             "eval_config")
REQUIRED = {"skypilot": ("config", "workdir", "accelerator", "repo"),
            "xpk": ("config", "workdir", "accelerator", "cluster"),
            "preflight": ("config", "accelerator")}


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-launch ENGINE``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status; :func:`byol_flax.runtime.commands.run_command`)."""
    return commands.run_command(_main, __name__, flag_values=COMMAND_FLAGS, argv=argv)


def given_flags(engine: str) -> str:
    """The command line that reproduces this output: the flags given, in definition order."""
    given = [COMMAND_FLAGS[name].serialize() for name in ENGINE_FLAGS[engine]
             if COMMAND_FLAGS[name].present]
    return shlex.join(["byol-launch", engine, *[arg for text in given
                                                for arg in text.splitlines()]])


def _check_flags(argv: list[str]) -> str:
    if len(argv) != 2 or argv[1] not in ENGINES:
        given = f"got {argv[1:]}" if len(argv) != 2 else f"got {argv[1]!r}"
        raise app.UsageError(f"expected one engine of {', '.join(ENGINES)}; {given}")
    engine = argv[1]
    foreign = [name for name in COMMAND_FLAGS if COMMAND_FLAGS[name].present
               and name not in ENGINE_FLAGS[engine] and COMMAND_FLAGS[name].name == name]
    if foreign:
        raise app.UsageError(f"--{foreign[0]} is not a flag of {engine}")
    missing = [name for name in REQUIRED[engine] if COMMAND_FLAGS[name].value is None]
    if missing:
        raise app.UsageError(f"{engine} needs --{missing[0]}")
    for name in ENGINE_FLAGS[engine]:
        values = COMMAND_FLAGS[name].value
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and (bad := _CONTROL.search(value)):
                raise app.UsageError(f"--{name}={value!r} holds the control character "
                                     f"{bad.group()!r}: a value goes into a task definition "
                                     "(YAML, a shell line) and must be one plain line")
    return engine


def _main(argv: list[str]) -> int:
    engine = _check_flags(argv)
    accelerator = tasks.parse_accelerator(_ACCELERATOR.value)
    overrides = tuple(_OVERRIDE.value)
    if engine == "preflight":
        return _preflight(accelerator, overrides)
    if engine == "skypilot":
        commit = _COMMIT.value or tasks.pinned_commit()
        task = tasks.SkyTask(
            config=_CONFIG.value, workdir=_WORKDIR.value, accelerator=accelerator,
            repo=_REPO.value, commit=commit, name=_NAME.value, num_nodes=_NUM_NODES.value,
            use_spot=_SPOT.value, strategy=_STRATEGY.value,
            max_restarts_on_errors=_MAX_RESTARTS_ON_ERRORS.value, cloud=_CLOUD.value or None,
            region=_REGION.value, zone=_ZONE.value, runtime_version=_RUNTIME_VERSION.value,
            overrides=overrides)
        print(task.to_yaml(header=f"# Generated by: {given_flags(engine)}\n"
                                  "# Run and recover: sky jobs launch THIS_FILE\n"), end="")
    else:
        workload = tasks.XpkWorkload(
            config=_CONFIG.value, workdir=_WORKDIR.value, accelerator=accelerator,
            cluster=_CLUSTER.value, name=_NAME.value, num_slices=_NUM_SLICES.value,
            max_restarts=_MAX_RESTARTS.value, docker_image=_DOCKER_IMAGE.value,
            base_docker_image=_BASE_DOCKER_IMAGE.value, project=_PROJECT.value,
            zone=_ZONE.value, overrides=overrides)
        if not workload.docker_image:
            print("# ships the checkout it is run from (--script-dir=.): run it from the "
                  "repository root", file=sys.stderr)
        print(f"# Generated by: {given_flags(engine)}\n{shlex.join(workload.argv())}")
    if accelerator.kind == "tpu":
        print(f"# {accelerator.name}: {hosts_in_slice(accelerator.name)} host(s), "
              f"{devices_in_slice(accelerator.name)} JAX devices", file=sys.stderr)
    return 0


def _preflight(accelerator: tasks.Accelerator, overrides: tuple[str, ...]) -> int:
    """Compiles the step for the slice; 0 when it fits, 1 when it does not."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu compiles; no TPU is initialised
    from byol_flax.cloud import preflight

    if accelerator.kind != "tpu":
        raise app.UsageError(f"--accelerator={_ACCELERATOR.value}: the pre-flight compiles "
                             "for TPU slices (tpu-v4-64, v5p-256); this JAX version has no "
                             "way to compile for GPUs without one (docs/performance.md)")
    if os.environ.get(_PREFLIGHT_CHILD) != "1":
        return _preflight_in_child(accelerator)
    config = preflight.load_config(_CONFIG.value, overrides)
    eval_configs = [(spec, preflight.load_config(spec)) for spec in _EVAL_CONFIG.value]
    report = preflight.preflight(config, accelerator.name, num_slices=_NUM_SLICES.value,
                                 hlo_out=_HLO_OUT.value, eval_configs=eval_configs)
    for line in preflight.format_report(report, _CONFIG.value):
        print(line)
    print(json.dumps(report, sort_keys=True))
    return 0 if report["fits"] else 1


def _preflight_in_child(accelerator: tasks.Accelerator) -> int:
    """The pre-flight in a child process: libtpu's compiler can crash (a segmentation fault
    compiling ResNet-50 for v6e-64 with libtpu 0.0.42.1), which no Python code survives; the
    crash is then one line here instead of a core dump."""
    flags_given = shlex.split(given_flags("preflight"))[2:]
    child = subprocess.run(
        [sys.executable, "-m", "byol_flax.cloud.launch", "preflight", *flags_given],
        env={**os.environ, _PREFLIGHT_CHILD: "1"}, stdout=subprocess.PIPE, text=True,
        check=False)
    sys.stdout.write(child.stdout)
    sys.stdout.flush()
    if child.returncode < 0:
        from byol_flax.cloud.preflight import PreflightError

        raise PreflightError(
            f"libtpu crashed ({signal.Signals(-child.returncode).name}) compiling for "
            f"{accelerator.name}: a fault of the compiler, not of the config; its stack is "
            "above; another libtpu version or slice size may compile")
    return child.returncode


if __name__ == "__main__":
    raise SystemExit(main())
