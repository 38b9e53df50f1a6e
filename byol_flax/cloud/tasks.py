"""Task definitions for engines that recover preempted jobs by themselves.

A preempted spot slice has to be recreated, the project installed again and the same training
command started against the same workdir, which then resumes from its newest checkpoint. Two
engines do exactly that, so the project writes their task definitions instead of a loop of its
own: a SkyPilot managed job (spot TPU VMs and GPU nodes; SkyPilot recreates the cluster, runs
``setup`` and ``run`` again) and an xpk workload on GKE (large TPU slices and multi-slice runs;
the JobSet restarts up to ``--max-restarts`` times). Both run the README's training command,
``byol-train --config=... --workdir=gs://...``; the code they install is pinned: a git commit
(SkyPilot clones the repository at it) or a Docker image (xpk).
"""

import dataclasses
import json
import re
import shlex
from typing import Any

from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice
from byol_flax.errors import UserError
from byol_flax.runtime import code_identity

# TPU VM images by chip family (Google's TPU VM software versions); SkyPilot's own default
# (tpu-vm-base) is an older image.
RUNTIME_BY_FAMILY = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                     "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                     "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                     "v6e": "v2-alpha-tpuv6e"}
# SkyPilot's recovery strategies: FAILOVER retries the region it ran in first (where the gs://
# data and workdir are), EAGER_NEXT_REGION moves on at once.
RECOVERY_STRATEGIES = ("FAILOVER", "EAGER_NEXT_REGION")
# The images ship Python 3.10; the project needs 3.11+, in its own environment.
VENV = "~/byol_venv"
# Process 0's port for jax.distributed on multi-node GPU clusters.
COORDINATOR_PORT = 8476
# xpk copies --script-dir into this image when no --docker-image is given.
BASE_DOCKER_IMAGE = "python:3.11"
# SkyPilot job and xpk workload names (xpk's own pattern, at most 40 characters).
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


class TaskError(UserError, ValueError):
    """A flag value the task definition cannot use; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """``tpu-v4-64`` / ``v4-64`` (a TPU slice) or ``H100:8`` (GPUs per node)."""

    kind: str  # "tpu" or "gpu"
    name: str  # v4-64 (without "tpu-") or H100
    count: int = 1  # GPUs per node

    @property
    def family(self) -> str:
        return self.name.split("-")[0]

    @property
    def skypilot(self) -> str:
        return f"tpu-{self.name}" if self.kind == "tpu" else f"{self.name}:{self.count}"


def parse_accelerator(text: str) -> Accelerator:
    """``--accelerator``: a TPU type known to :mod:`byol_flax.cloud.slices` or ``GPU:COUNT``."""
    name = text.removeprefix("tpu-")
    if re.fullmatch(r"v\d+[a-z]*-\d+", name):
        try:
            devices_in_slice(name)
        except ValueError as error:
            raise TaskError(f"--accelerator={text}: {error}") from None
        return Accelerator("tpu", name)
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9-]*)(?::(\d+))?", text)
    if not match or (match.group(2) and int(match.group(2)) < 1):
        raise TaskError(f"--accelerator={text}: expected a TPU slice (tpu-v4-64) or GPUs per "
                        "node (H100:8)")
    return Accelerator("gpu", match.group(1), int(match.group(2) or 1))


def check_name(name: str, flag: str = "--name") -> str:
    """A job or workload name both engines take (lowercase, digits, hyphens; 40 at most)."""
    if not _NAME.fullmatch(name) or len(name) > 40:
        raise TaskError(f"{flag}={name}: use lowercase letters, digits and hyphens (starting "
                        "with a letter, at most 40 characters)")
    return name


def check_workdir(workdir: str) -> str:
    """A recovered job starts on new machines: only a bucket keeps the checkpoints."""
    if not workdir.startswith("gs://") or len(workdir) <= len("gs://"):
        raise TaskError(f"--workdir={workdir}: a recovered job runs on new machines; give a "
                        "gs://BUCKET/PATH that keeps the checkpoints")
    return workdir


def pinned_commit(identity: dict[str, Any] | None = None) -> str:
    """The commit of the running byol_flax (:mod:`byol_flax.runtime.code_identity`) for a task
    to check out; a checkout with uncommitted changes is refused (what would run remotely is
    not what is here), and so is code whose commit is unknown."""
    identity = identity or code_identity.code_identity()
    if not identity.get("commit"):
        raise TaskError("the source commit of this byol_flax is unknown (neither a git checkout "
                        "nor installed from git): pass --commit=SHA")
    if identity.get("dirty"):
        raise TaskError(f"the checkout at {identity['commit'][:12]} has uncommitted changes: "
                        "commit them, or pass --commit=SHA to pin a commit explicitly")
    return identity["commit"]


def train_command(config: str, workdir: str, overrides: tuple[str, ...] = (),
                  distributed: tuple[str, ...] = ()) -> str:
    """The README's training command, shell-quoted."""
    return shlex.join(["byol-train", f"--config={config}", f"--workdir={workdir}",
                       *distributed, *overrides])


@dataclasses.dataclass(frozen=True)
class SkyTask:
    """A SkyPilot managed job: ``sky jobs launch FILE`` runs it and recovers it."""

    config: str
    workdir: str
    accelerator: Accelerator
    repo: str
    commit: str
    name: str = "byol"
    num_nodes: int = 1
    use_spot: bool = True
    strategy: str = "FAILOVER"
    max_restarts_on_errors: int = 3
    cloud: str | None = "gcp"
    region: str | None = None
    zone: str | None = None
    runtime_version: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        check_workdir(self.workdir)
        if self.strategy not in RECOVERY_STRATEGIES:
            raise TaskError(f"--recovery_strategy={self.strategy}: choose from "
                            f"{', '.join(RECOVERY_STRATEGIES)}")
        if self.num_nodes < 1 or (self.accelerator.kind == "tpu" and self.num_nodes != 1):
            raise TaskError(f"--num_nodes={self.num_nodes}: a TPU slice is one node (its hosts "
                            "all run the task); GPUs take 1 or more")
        if self.max_restarts_on_errors < 0:
            raise TaskError(f"--max_restarts_on_errors={self.max_restarts_on_errors}: must be "
                            ">= 0")
        if not self.repo or ("://" not in self.repo and not self.repo.startswith("git@")):
            raise TaskError(f"--repo={self.repo}: give the git URL SkyPilot clones (https:// or "
                            "git@...)")

    def setup(self) -> str:
        jax = '"jax[tpu]" .' if self.accelerator.kind == "tpu" else '".[cuda]"'
        return "\n".join([
            "set -ex",
            "python3 -m pip install --user uv",
            f"[ -x {VENV}/bin/python ] || python3 -m uv venv --seed --python 3.11 {VENV}",
            f"{VENV}/bin/pip install -c constraints.txt {jax}"])

    def run(self) -> str:
        lines = ["set -e", f"source {VENV}/bin/activate"]
        if self.accelerator.kind == "tpu":
            # Every host of the slice runs this; jax.distributed finds its peers by itself.
            distributed = ("--distributed",) if hosts_in_slice(self.accelerator.name) > 1 else ()
        elif self.num_nodes > 1:
            lines.append(f'COORDINATOR="$(echo "$SKYPILOT_NODE_IPS" | head -n1):'
                         f'{COORDINATOR_PORT}"')
            distributed = ()
        else:
            distributed = ()
        command = train_command(self.config, self.workdir, self.overrides, distributed)
        if self.accelerator.kind == "gpu" and self.num_nodes > 1:
            command += (' --coordinator_address="$COORDINATOR"'
                        ' --num_processes="$SKYPILOT_NUM_NODES"'
                        ' --process_id="$SKYPILOT_NODE_RANK"')
        return "\n".join([*lines, command])

    def resources(self) -> dict[str, object]:
        resources: dict[str, object] = {}
        for key, value in (("cloud", self.cloud), ("region", self.region), ("zone", self.zone)):
            if value:
                resources[key] = value
        resources["accelerators"] = self.accelerator.skypilot
        if self.accelerator.kind == "tpu":
            resources["accelerator_args"] = {"runtime_version": self.runtime_version
                                             or RUNTIME_BY_FAMILY[self.accelerator.family]}
        resources["use_spot"] = self.use_spot
        resources["job_recovery"] = {"strategy": self.strategy,
                                     "max_restarts_on_errors": self.max_restarts_on_errors}
        return resources

    def to_yaml(self, header: str = "") -> str:
        """The task file (YAML written here: JSON-quoted scalars, literal blocks for scripts)."""
        task = {"name": self.name, "resources": self.resources(), "num_nodes": self.num_nodes,
                "workdir": {"url": self.repo, "ref": self.commit},
                "setup": self.setup(), "run": self.run()}
        return header + "".join(_yaml_lines(task, 0))


def _yaml_lines(mapping: dict[str, object], indent: int) -> list[str]:
    pad, lines = "  " * indent, []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:\n")
            lines.extend(_yaml_lines(value, indent + 1))
        elif isinstance(value, str) and "\n" in value:
            block = "".join(f"{pad}  {line}\n" for line in value.splitlines())
            lines.append(f"{pad}{key}: |\n{block}")
        else:
            lines.append(f"{pad}{key}: {json.dumps(value)}\n")
    return lines


@dataclasses.dataclass(frozen=True)
class XpkWorkload:
    """An xpk workload: ``xpk workload create ...`` on a GKE cluster with TPU node pools."""

    config: str
    workdir: str
    accelerator: Accelerator
    cluster: str
    name: str = "byol"
    num_slices: int = 1
    max_restarts: int = 10
    docker_image: str | None = None
    base_docker_image: str = BASE_DOCKER_IMAGE
    script_dir: str = "."
    project: str | None = None
    zone: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        check_name(self.cluster, "--cluster")
        check_workdir(self.workdir)
        if self.accelerator.kind != "tpu":
            raise TaskError(f"--accelerator={self.accelerator.skypilot}: the xpk workload is "
                            "for TPU slices; run GPUs as a SkyPilot managed job")
        if self.num_slices < 1 or self.max_restarts < 0:
            raise TaskError(f"--num_slices={self.num_slices} --max_restarts={self.max_restarts}:"
                            " need >= 1 slice and >= 0 restarts")

    def command(self) -> str:
        """The training command; without a prebuilt image, xpk copies the checkout into the base
        image and the command installs it first (at the constraints' releases)."""
        hosts = hosts_in_slice(self.accelerator.name) * self.num_slices
        train = train_command(self.config, self.workdir, self.overrides,
                              ("--distributed",) if hosts > 1 else ())
        if self.docker_image:
            return train
        return f'pip install -c constraints.txt "jax[tpu]" . && {train}'

    def argv(self) -> list[str]:
        argv = ["xpk", "workload", "create", f"--cluster={self.cluster}",
                f"--workload={self.name}", f"--tpu-type={self.accelerator.name}",
                f"--num-slices={self.num_slices}", f"--max-restarts={self.max_restarts}"]
        argv += [f"--project={self.project}"] if self.project else []
        argv += [f"--zone={self.zone}"] if self.zone else []
        if self.docker_image:
            argv.append(f"--docker-image={self.docker_image}")
        else:
            argv += [f"--base-docker-image={self.base_docker_image}",
                     f"--script-dir={self.script_dir}"]
        return [*argv, f"--command={self.command()}"]
