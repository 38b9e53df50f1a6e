"""Cloud TPU VM launcher: prints (default) or runs the ``gcloud`` commands of a BYOL run.

    python -m byol_flax.cloud.launch ACTION --tpu=NAME --zone=ZONE --accelerator-type=v4-64 \\
        --config=byol_imagenet:r50x1 --workdir=gs://BUCKET/run [--spot] [--run]

Actions: ``create`` (the TPU VM slice, optionally spot/preemptible), ``install`` (Python 3.11 in
a virtual environment, clone this repository and install it with JAX for TPU on every worker, at
the exact releases of the repository's ``constraints.txt``), ``train`` (start the same training
command on every worker, in the background, logging to ``~/byol_train.log``), ``logs`` (follow
worker 0's log), ``relaunch`` (after a preemption: delete, create, install, train against the
same workdir, which resumes from its newest checkpoint), ``delete``, and ``up`` (create + install
+ train). Without ``--run`` nothing is executed: the commands are printed, one per line. A bad
flag, a missing ``gcloud`` or a failed command is one line naming it.
"""

import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice
from byol_flax.errors import UserError
from byol_flax.runtime import console

DEFAULT_REPO = "https://github.com/byol-flax/byol_flax.git"
# TPU VM software versions by chip family (Google's TPU VM images).
RUNTIME_BY_FAMILY = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                     "v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                     "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
                     "v6e": "v2-alpha-tpuv6e"}
LOG_FILE = "~/byol_train.log"
CHECKOUT = "~/byol_flax"
# The images ship Python 3.10; the project needs 3.11+, installed into its own environment.
VENV = "~/byol_venv"
# The tested releases (the CI's); jax[tpu] adds the libtpu that the pinned jax requires.
CONSTRAINTS = f"{CHECKOUT}/constraints.txt"
ACTIONS = ("create", "install", "train", "logs", "relaunch", "delete", "up")


class LaunchError(UserError, RuntimeError):
    """A ``gcloud`` command of ``--run`` failed (gcloud printed why)."""


@dataclasses.dataclass(frozen=True)
class Launch:
    tpu: str
    zone: str
    accelerator_type: str
    config: str
    workdir: str
    project: str | None = None
    runtime_version: str | None = None  # default: by chip family
    capacity: str = "on-demand"  # or "spot" / "preemptible"
    repo: str = DEFAULT_REPO
    overrides: tuple[str, ...] = ()

    def _gcloud(self, verb: str, *args: str) -> list[str]:
        command = ["gcloud", "compute", "tpus", "tpu-vm", verb, self.tpu, f"--zone={self.zone}"]
        if self.project:
            command.append(f"--project={self.project}")
        return command + list(args)

    def _on_workers(self, remote: str, worker: str = "all") -> list[str]:
        return self._gcloud("ssh", f"--worker={worker}", f"--command={remote}")

    def create(self) -> list[list[str]]:
        extra = {"spot": ["--spot"], "preemptible": ["--preemptible"]}.get(self.capacity, [])
        runtime = self.runtime_version or RUNTIME_BY_FAMILY[self.accelerator_type.split("-")[0]]
        return [self._gcloud("create", f"--accelerator-type={self.accelerator_type}",
                             f"--version={runtime}", *extra)]

    def install(self) -> list[list[str]]:
        remote = ("sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv"
                  f" && python3.11 -m venv {VENV}"
                  f" && (git clone --depth 1 {self.repo} {CHECKOUT} || git -C {CHECKOUT} pull)"
                  f' && {VENV}/bin/pip install -c {CONSTRAINTS} "jax[tpu]" -e {CHECKOUT}')
        return [self._on_workers(remote)]

    def train(self) -> list[list[str]]:
        multi_host = ("--distributed",) if hosts_in_slice(self.accelerator_type) > 1 else ()
        args = " ".join(shlex.quote(a) for a in (f"--config={self.config}",
                                                 f"--workdir={self.workdir}", *multi_host,
                                                 *self.overrides))
        remote = (f"cd {CHECKOUT} && nohup {VENV}/bin/python -m byol_flax.main {args} "
                  f"< /dev/null > {LOG_FILE} 2>&1 &")
        return [self._on_workers(remote)]

    def logs(self) -> list[list[str]]:
        return [self._on_workers(f"tail -f {LOG_FILE}", worker="0")]

    def delete(self) -> list[list[str]]:
        return [self._gcloud("delete", "--quiet")]

    def up(self) -> list[list[str]]:
        return self.create() + self.install() + self.train()

    def relaunch(self) -> list[list[str]]:
        return self.delete() + self.up()

    def commands(self, action: str) -> list[list[str]]:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; choose from {ACTIONS}")
        return getattr(self, action)()


# The command's own flags (console.run_command): importing this module defines no global absl
# flag (its --config is a plain string, not byol_flax.main's config flag).
COMMAND_FLAGS = flags.FlagValues()
_TPU = flags.DEFINE_string("tpu", None, "TPU VM name", flag_values=COMMAND_FLAGS)
_ZONE = flags.DEFINE_string("zone", None, "e.g. us-central2-b", flag_values=COMMAND_FLAGS)
_ACCELERATOR_TYPE = flags.DEFINE_string("accelerator-type", None, "e.g. v4-8, v4-64, v3-512",
                                        flag_values=COMMAND_FLAGS)
_CONFIG = flags.DEFINE_string("config", None,
                              "config name or module and argument, e.g. byol_imagenet:r50x1",
                              flag_values=COMMAND_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "gs://BUCKET/PATH (shared by workers)",
                               flag_values=COMMAND_FLAGS)
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project (default: gcloud's)",
                               flag_values=COMMAND_FLAGS)
_RUNTIME_VERSION = flags.DEFINE_string(
    "runtime-version", None, "TPU VM image (default: by chip family, e.g. tpu-ubuntu2204-base "
    "for v4)", flag_values=COMMAND_FLAGS)
_SPOT = flags.DEFINE_boolean("spot", False, "create a spot TPU VM", flag_values=COMMAND_FLAGS)
_PREEMPTIBLE = flags.DEFINE_boolean("preemptible", False, "create a preemptible TPU VM",
                                    flag_values=COMMAND_FLAGS)
_REPO = flags.DEFINE_string("repo", DEFAULT_REPO, "git URL cloned on every worker",
                            flag_values=COMMAND_FLAGS)
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "extra flag passed to byol_flax.main, e.g. "
    "--override=--config.data.dir=gs://BUCKET/imagenet", flag_values=COMMAND_FLAGS)
_RUN = flags.DEFINE_boolean("run", False, "execute the commands (default: print them)",
                            flag_values=COMMAND_FLAGS)
flags.mark_flags_as_required(["tpu", "zone", "accelerator-type", "config", "workdir"],
                             flag_values=COMMAND_FLAGS)
flags.mark_bool_flags_as_mutual_exclusive(["spot", "preemptible"], flag_values=COMMAND_FLAGS)


@flags.validator("accelerator-type", flag_values=COMMAND_FLAGS)
def _known_accelerator_type(value: str | None) -> bool:
    """An unknown accelerator type is a flag error, before anything runs."""
    if value is not None:
        try:
            devices_in_slice(value)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from error
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-launch ACTION``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process
    (returns the exit status; :func:`byol_flax.runtime.console.run_command`)."""
    return console.run_command(_main, __name__, flag_values=COMMAND_FLAGS, argv=argv)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ACTIONS:
        given = f"got {argv[1:]}" if len(argv) != 2 else f"got {argv[1]!r}"
        raise app.UsageError(f"expected one action of {', '.join(ACTIONS)}; {given}")
    action, workdir, accelerator_type = argv[1], _WORKDIR.value, _ACCELERATOR_TYPE.value
    if not workdir.startswith("gs://"):
        print(f"warning: --workdir={workdir} is not gs://; workers do not share local "
              "disks, so checkpoints would not survive a relaunch", file=sys.stderr)
    capacity = "spot" if _SPOT.value else "preemptible" if _PREEMPTIBLE.value else "on-demand"
    launch = Launch(tpu=_TPU.value, zone=_ZONE.value, accelerator_type=accelerator_type,
                    config=_CONFIG.value, workdir=workdir, project=_PROJECT.value,
                    runtime_version=_RUNTIME_VERSION.value, capacity=capacity,
                    repo=_REPO.value, overrides=tuple(_OVERRIDE.value))
    print(f"# {accelerator_type}: {hosts_in_slice(accelerator_type)} worker(s), "
          f"{devices_in_slice(accelerator_type)} JAX devices", file=sys.stderr)
    for command in launch.commands(action):
        print(shlex.join(command), flush=True)
        if _RUN.value:
            if subprocess.run(command).returncode:  # gcloud printed why
                raise LaunchError(f"{shlex.join(command[:5])} ... failed (its output is above); "
                                  "the commands after it were not run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
