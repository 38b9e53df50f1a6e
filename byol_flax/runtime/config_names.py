"""``--config=NAME[:ARG]`` -> the shipped config module's path: the lookup every command uses.

Config modules ship inside the package (``byol_flax/configs/``), so an installed user names
them: ``--config=byol_imagenet:r50x1`` is ``byol_flax/configs/byol_imagenet.py:r50x1``,
``--config=studies/table21`` a study module. A path to any other ``.py`` file is used as it is
(``--config=my_configs/x.py:arg``). The lookup reads the folder; it imports no config module
(:func:`load_config` does, for tools that build a config without absl's flag).
"""

import importlib.util
import pathlib
import sys
import types
from collections.abc import Sequence
from typing import Any

from byol_flax.errors import UserError
from byol_flax.storage import files

# The shipped config modules (a folder of the package; read here by path, never imported).
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


class UnknownConfigError(UserError, ValueError):
    """A ``--config`` value that is neither a ``.py`` file nor a shipped config name, or a
    ``.py`` path with no file there."""


def names(subdir: str = "") -> list[str]:
    """Shipped config names (``subdir="studies"``: the study modules)."""
    root = CONFIG_DIR / subdir
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in root.glob("*.py")
                  if not p.name.startswith("_") and _is_config_module(p, subdir))


def _is_config_module(path: pathlib.Path, subdir: str) -> bool:
    """An experiment config (``get_config``) or, under ``studies``, a study module (one that
    registers a study)."""
    marker = "@STUDIES.register(" if subdir == "studies" else "def get_config("
    return marker in files.read_text(path, what="config module")


def resolve(spec: str, *, subdir: str = "") -> str:
    """``"NAME[:ARG]"`` -> ``"/abs/path/NAME.py[:ARG]"`` for a shipped config; a ``.py`` path is
    returned unchanged once it is a file. ``subdir`` is where a bare name is looked up first
    (studies)."""
    path, sep, arg = spec.partition(":")
    if path.endswith(".py"):
        if not pathlib.Path(path).is_file():  # ml_collections would defer this to the first use
            raise UnknownConfigError(f"config file {path!r} "
                                     + ("is not a file" if pathlib.Path(path).exists()
                                        else "does not exist"))
        return spec
    # Under ``subdir`` only: --study=digits_cpu must not find the training config.
    candidates = [f"{subdir}/{path}", path] if subdir else [path]
    for candidate in (c for c in candidates if not subdir or c.startswith(f"{subdir}/")):
        file = CONFIG_DIR / f"{candidate}.py"
        if file.is_file() and not file.name.startswith("_") and \
                _is_config_module(file, candidate.rpartition("/")[0]):
            return f"{file}{sep}{arg}"
    raise UnknownConfigError(f"{spec!r} is neither a .py file nor a shipped config; names: "
                             f"{', '.join(names(subdir) or names())}")


def resolve_flag(argv: Sequence[str], flag: str = "config", *, subdir: str = "") -> list[str]:
    """``argv`` with ``--FLAG=NAME[:ARG]`` / ``--FLAG NAME[:ARG]`` resolved by :func:`resolve`
    (before absl or argparse sees it; ``--FLAG.key=value`` overrides are left alone)."""
    out = list(argv)
    for index, item in enumerate(out):
        if item.startswith(f"--{flag}="):
            out[index] = f"--{flag}=" + resolve(item.split("=", 1)[1], subdir=subdir)
        elif item == f"--{flag}" and index + 1 < len(out):
            out[index + 1] = resolve(out[index + 1], subdir=subdir)
    return out


def load_module(path: str, name: str) -> types.ModuleType:
    """Imports a Python file by path (study and config modules are files, like --config's)."""
    file = pathlib.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no such module file: {path}")
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(file):
        return loaded  # its registrations are in place; executing it again would repeat them
    spec = importlib.util.spec_from_file_location(name, str(file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> Any:
    """``"NAME[:ARG]"`` or ``"path.py[:ARG]"`` -> ``get_config(ARG)``, locked (what
    ``--config=`` does)."""
    path, _, arg = resolve(spec).partition(":")
    module = load_module(path, f"byol_flax_config_{pathlib.Path(path).stem}")
    config = module.get_config(arg or None)
    config.lock()
    return config
