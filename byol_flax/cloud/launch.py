"""Cloud TPU VM launcher: prints (default) or runs the ``gcloud`` commands of a BYOL run.

    python -m byol_flax.cloud.launch ACTION --tpu NAME --zone ZONE --accelerator-type v4-64 \\
        --config byol_imagenet:r50x1 --workdir gs://BUCKET/run [--spot] [--run]

Actions: ``create`` (the TPU VM slice, optionally spot/preemptible), ``install`` (Python 3.11 in
a virtual environment, clone this repository and install it with JAX for TPU on every worker, at
the exact releases of the repository's ``constraints.txt``), ``train`` (start the same training
command on every worker, in the background, logging to ``~/byol_train.log``), ``logs`` (follow
worker 0's log), ``relaunch`` (after a preemption: delete, create, install, train against the
same workdir, which resumes from its newest checkpoint), ``delete``, and ``up`` (create + install
+ train). Without ``--run`` nothing is executed: the commands are printed, one per line. A bad
argument, a missing ``gcloud`` or a failed command is one line naming it.
"""

import argparse
import dataclasses
import shlex
import subprocess
import sys
from collections.abc import Sequence

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


def build_parser() -> argparse.ArgumentParser:
    parser = console.ArgumentParser(
        prog="python -m byol_flax.cloud.launch", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v4-64, v3-512")
    parser.add_argument("--config", required=True,
                        help="config name or module and argument, e.g. byol_imagenet:r50x1")
    parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH (shared by workers)")
    parser.add_argument("--project", default=None)
    parser.add_argument("--runtime-version", default=None,
                        help="TPU VM image (default: by chip family, e.g. tpu-ubuntu2204-base "
                             "for v4)")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_const", const="spot", dest="capacity")
    capacity.add_argument("--preemptible", action="store_const", const="preemptible",
                          dest="capacity")
    parser.add_argument("--repo", default=DEFAULT_REPO, help="git URL cloned on every worker")
    parser.add_argument("--override", action="append", default=[], metavar="--config.KEY=VALUE",
                        help="extra flag passed to byol_flax.main (repeatable)")
    parser.add_argument("--run", action="store_true",
                        help="execute the commands (default: print them)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        devices_in_slice(args.accelerator_type)
    except ValueError as error:  # an unknown accelerator type, before anything runs
        parser.error(f"--accelerator-type: {error}")
    return console.run_cli(lambda: _main(args), "byol_flax.cloud.launch")


def _main(args: argparse.Namespace) -> int:
    if not args.workdir.startswith("gs://"):
        print(f"warning: --workdir={args.workdir} is not gs://; workers do not share local "
              "disks, so checkpoints would not survive a relaunch", file=sys.stderr)
    launch = Launch(tpu=args.tpu, zone=args.zone, accelerator_type=args.accelerator_type,
                    config=args.config, workdir=args.workdir, project=args.project,
                    runtime_version=args.runtime_version, capacity=args.capacity or "on-demand",
                    repo=args.repo, overrides=tuple(args.override))
    print(f"# {args.accelerator_type}: {hosts_in_slice(args.accelerator_type)} worker(s), "
          f"{devices_in_slice(args.accelerator_type)} JAX devices", file=sys.stderr)
    for command in launch.commands(args.action):
        print(shlex.join(command), flush=True)
        if args.run:
            if subprocess.run(command).returncode:  # gcloud printed why
                raise LaunchError(f"{shlex.join(command[:5])} ... failed (its output is above); "
                                  "the commands after it were not run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
