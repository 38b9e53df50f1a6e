"""``pip install .`` (not editable) gives commands that work from any directory.

The wheel is built from a copy of the working tree and installed, without dependencies, into a
fresh virtual environment. That environment borrows this one's third-party packages through a
``.pth`` file (no network, no second copy of JAX and TensorFlow) but cannot see the checkout:
``byol_flax`` is imported from the wheel's files even where this environment holds an editable
install (a developer's) or a regular one (CI's). Every console entry point is then run from a
directory outside the checkout, and the demo end to end in its smoke size.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from byol_flax.studies import report
from tests.test_demo import assert_smoke_demo_outputs

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# A flag each command's --help must list: the right parser answered.
HELP_FLAG = {"byol-train": "--workdir", "byol-evaluate": "--source", "byol-export": "--out",
             "byol-demo": "--seeds", "byol-study": "--study", "byol-launch": "--accelerator",
             "byol-convert-digits": "--holdout-count", "byol-convert-images": "--src",
             "byol-convert-tfds": "--name", "byol-import-official": "--checkpoint",
             "byol-add-results": "--results"}
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


@dataclasses.dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    elsewhere: Path  # a working directory outside the checkout
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.venv / "bin" / argv[0]), *argv[1:]], cwd=self.elsewhere,
                              env=self.env, capture_output=True, text=True, timeout=timeout)


def _check(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    # A copy of what the build reads (the root's files and the package), so the build writes
    # its build/ and *.egg-info there and not into the shared checkout.
    source = root / "source"
    shutil.copytree(REPO / "byol_flax", source / "byol_flax", ignore=IGNORED)
    for file in REPO.iterdir():
        if file.is_file():
            shutil.copy2(file, source / file.name)
    dist = root / "dist"
    _check([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
            "--no-index", "--wheel-dir", str(dist), str(source)])
    (wheel,) = dist.glob("byol_flax-*.whl")

    venv = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                           "'purelib'))"], capture_output=True, text=True, check=True)
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    # Plain paths in a .pth are appended to sys.path after the venv's own site-packages; the
    # .pth files inside them (an editable install's finder) are not run.
    (Path(site.stdout.strip()) / "_borrowed_site_packages.pth").write_text(
        "\n".join(sorted(ours)) + "\n")
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
            "--no-deps", "--no-index", "--ignore-installed", str(wheel)])

    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "XLA_FLAGS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return Installed(wheel, venv, elsewhere, env)


def test_the_wheel_holds_every_file_of_the_package(installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
    package = {p.relative_to(REPO).as_posix() for p in (REPO / "byol_flax").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert package - names == set()
    for shipped in ("byol_flax/configs/digits_cpu.py", "byol_flax/configs/studies/table21.py",
                    "byol_flax/data/convert/digits.py"):
        assert shipped in names
    top = {n.split("/")[0] for n in names}
    assert top == {"byol_flax", f"byol_flax-{PYPROJECT['project']['version']}.dist-info"}


def test_byol_flax_is_imported_from_the_new_environment_not_the_checkout(installed):
    done = installed.run("python", "-c", "import byol_flax, importlib.metadata as m; "
                         "print(byol_flax.__file__); print(m.distribution('byol_flax')"
                         ".read_text('direct_url.json') or '')")
    assert done.returncode == 0, done.stderr
    module_file, direct_url = done.stdout.splitlines()[0], "\n".join(done.stdout.splitlines()[1:])
    module_file = Path(module_file).resolve()
    assert module_file.is_relative_to(installed.venv.resolve())
    assert not module_file.is_relative_to(REPO)
    assert '"editable": true' not in direct_url


@pytest.mark.slow  # ~20 s: three of the commands import TensorFlow (through CLU)
def test_every_console_entry_point_answers_help_outside_the_checkout(installed):
    assert set(SCRIPTS) == set(HELP_FLAG)

    def help_of(name: str) -> subprocess.CompletedProcess:
        return installed.run(name, "--help")

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = dict(zip(SCRIPTS, pool.map(help_of, SCRIPTS)))
    for name, done in results.items():
        output = done.stdout + done.stderr
        # Every command is an absl app: --help exits with status 1 (absl's convention).
        assert done.returncode == 1, f"{name} --help:\n{output}"
        assert "Traceback" not in output, f"{name} --help:\n{output}"
        # The command's own flags, not only absl's "Try --helpfull".
        assert HELP_FLAG[name] in output, f"{name} --help does not list {HELP_FLAG[name]}"


def test_a_shipped_config_name_resolves_and_a_missing_data_dir_fails_naming_it(installed):
    missing = installed.elsewhere / "no_digits_here"
    done = installed.run("python", "-m", "byol_flax.main", f"--config=digits_cpu:{missing}",
                         f"--workdir={installed.elsewhere / 'train'}")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert f"error: DataError: data directory {missing} does not exist" in output
    assert "Traceback" not in output


def test_a_shipped_study_is_named_and_prints_its_commands(installed):
    """configs/studies ship: ``--study=NAME`` resolves in the installed package."""
    done = installed.run("byol-study", "--study=table21", f"--workdir={installed.elsewhere / 's'}",
                         "--print")
    assert done.returncode == 0, done.stdout + done.stderr
    commands = done.stdout.splitlines()
    assert commands and all(c.startswith("python -m byol_flax.") for c in commands)


@pytest.mark.slow  # ~60 s on 2 cores: the suite's one smoke demo
def test_the_demo_runs_from_the_entry_point_and_writes_its_report(installed):
    workdir = installed.elsewhere / "demo"
    done = installed.run("byol-demo", "--smoke", f"--workdir={workdir}", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    saved = json.loads((workdir / "report.json").read_text())
    for key in report.HEADLINE_KEYS:
        assert key in saved and saved[key] == printed[key], key
    assert_smoke_demo_outputs(workdir)


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_constraints_pin_releases_inside_pyproject_ranges():
    """constraints.txt (CI and the TPU launcher install with it) must satisfy pyproject.toml's
    ranges, and its libtpu must be the one the pinned jax's tpu extra asks for."""
    pins = _pins((REPO / "constraints.txt").read_text())
    project = PYPROJECT["project"]
    direct = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]
              ["dev"]]
    for requirement in direct:
        pinned = pins[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(pinned), (
            f"constraints.txt pins {requirement.name}=={pinned} outside pyproject.toml's "
            f"{requirement}")
        assert any(s.operator == "<" for s in requirement.specifier), (
            f"{requirement} has no upper bound")
    assert pins["jax"] == pins["jaxlib"]
    if metadata.version("jax") == pins["jax"]:  # the tested environment: read jax's own pin
        tpu = [Requirement(r) for r in metadata.requires("jax") or []
               if "libtpu" in r and 'extra == "tpu"' in r]
        assert tpu and all(r.specifier.contains(pins["libtpu"]) for r in tpu)


def test_the_default_install_brings_no_tensorflow():
    """TensorFlow is the tfds extra's alone: nothing the package requires (or anything those
    require, as installed here) pulls it in."""
    def requirements(name: str) -> list[Requirement]:
        try:
            found = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            return []
        return [r for r in map(Requirement, found)
                if r.marker is None or r.marker.evaluate({"extra": ""})]

    seen, queue = set(), [r for r in map(Requirement, PYPROJECT["project"]["dependencies"])]
    while queue:
        name = canonicalize_name(queue.pop().name)
        if name not in seen:
            seen.add(name)
            queue += requirements(name)
    assert not {name for name in seen if name.startswith("tensorflow")}, sorted(seen)
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [e for e, reqs in extras.items() if any(r.startswith("tensorflow-cpu") for r in reqs)
            ] == ["tfds"]
