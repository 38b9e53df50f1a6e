"""Every command in docs/cloud_tpu.md is one the project accepts.

Project commands are parsed by the project's own flags (the converters' absl flags, benchmarks),
run in dry-run mode (the launcher) or executed (the config check); external tools (gcloud,
tensorboard) are allowed only as the guide's upload and viewing steps.
"""

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from byol_flax.cloud import launch

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "cloud_tpu.md"
EXTERNAL = ("gcloud storage cp", "tensorboard --logdir")


def guide_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_the_guide_has_commands():
    commands = guide_commands()
    assert any("byol_flax.cloud.launch up" in c for c in commands)
    assert any("byol_flax.cloud.launch relaunch" in c for c in commands)
    assert any("byol_flax.data.convert.image_folder" in c for c in commands)


def benchmark_parser(script: str):
    """The parser of ``benchmarks/NAME.py``, imported as ``benchmarks.NAME``."""
    return importlib.import_module(script.removesuffix(".py").replace("/", ".")).build_parser()


@pytest.mark.parametrize("command", guide_commands())
def test_guide_command_is_accepted(command):
    if command.startswith(EXTERNAL):
        return
    argv = shlex.split(command)
    assert argv[0] == "python", f"unexpected program in the guide: {command}"
    if argv[1:3] == ["-m", "byol_flax.cloud.launch"]:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            assert launch.main(argv[3:]) == 0  # dry run: prints, executes nothing
        assert output.getvalue().startswith("gcloud compute tpus tpu-vm ")
    elif argv[1] == "-m" and argv[2].startswith("byol_flax.data.convert."):
        converter_flags = importlib.import_module(argv[2]).COMMAND_FLAGS  # absl, the command's own
        if converter_flags.is_parsed():
            converter_flags.unparse_flags()
        assert converter_flags([argv[2], *argv[3:]]) == [argv[2]]  # known flags, valid values
    elif argv[1] == "-c":
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(argv[2], "<guide>", "exec"), {})  # noqa: S102 - our own guide
    elif argv[1].startswith("benchmarks/"):
        benchmark_parser(argv[1]).parse_args(argv[2:])
    else:
        pytest.fail(f"the guide runs a command the test does not know: {command}")


def test_documented_launcher_output_is_exactly_what_it_prints():
    """A launcher command followed by a ```text block (prose with inline code between them)
    must print exactly that block."""
    pairs = re.findall(r"```bash\n(python -m byol_flax\.cloud\.launch [^\n]*)\n```\n\n"
                       r"(?:[^`]|`(?!``))*```text\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(pairs) == 2  # the single-host and the multi-host case
    for command, documented in pairs:
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            launch.main(shlex.split(command)[3:])
        assert output.getvalue() == documented


def test_guide_slice_table_matches_the_batch_plans():
    from byol_flax.cloud.slices import devices_in_slice, hosts_in_slice
    from byol_flax.configs import byol_imagenet

    rows = re.findall(r"^\| (v[\w-]+)[^|]*\| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$",
                      GUIDE.read_text(), flags=re.M)
    assert len(rows) == 4
    for accelerator, devices, workers, accumulation, per_device in rows:
        config = byol_imagenet.get_config(f"r50x1,slice={accelerator}")
        assert devices_in_slice(accelerator) == int(devices)
        assert hosts_in_slice(accelerator) == int(workers)
        assert config.training.accumulation_steps == int(accumulation)
        assert 4096 // int(accumulation) // int(devices) == int(per_device)
