"""Ablation studies as data: one :class:`Study` per paper table, rows = config overrides.

A study module (``byol_flax/configs/studies/table21.py`` etc.) defines ``STUDY``: the config every
row starts from, the evaluation that scores it, the seeds, and one :class:`Row` per line of the
paper's table with the overrides that make it and the value the paper reports. The launcher
(``python -m byol_flax.studies``) prints the commands of a study for a cluster or runs it here.
"""

import dataclasses
import importlib.util
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

# Section 5's SimCLR baseline (Appendix G.5): no predictor, the online network as its own target
# (gradient flowing), beta = 1 in Eq. 5 (the InfoNCE loss x 2 alpha) at SimCLR's best alpha 0.1.
SIMCLR = {"model.predictor.kind": "identity", "target.kind": "online", "loss.beta": 1.0,
          "loss.temperature": 0.1}
# Appendix J.1: no moving average; the target is a hard copy of the online network every step.
NO_EMA = {"target.base_ema": 0.0, "target.schedule": "constant"}


# The setup of Section 5 and Appendix G (300 epochs, LR 0.3, WD 1e-6, tau 0.99, batch 4096).
SECTION5_CONFIG = "byol_flax/configs/byol_imagenet_300ep.py:r50x1"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table: its config overrides and the paper's result (None: not reported)."""

    name: str
    overrides: Mapping[str, Any]
    paper_top1: float | None
    paper_top5: float | None = None
    paper_spread: float | None = None  # the paper's "±": half the max-min range over seeds
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
    table: str
    description: str
    rows: tuple[Row, ...]
    config: str = SECTION5_CONFIG  # "path/to/config.py[:arg]", as --config takes it
    # Evaluation configs scoring every run ("path.py[:arg]"); the first is the table's metric.
    evaluations: tuple[str, ...] = ("byol_flax/configs/eval_imagenet.py:linear",)
    seeds: tuple[int, ...] = (0, 1, 2)  # Appendix G: "averaged over 3 seeds"
    # Study-level overrides applied before every row's (e.g. a shared data directory).
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # "digits": the launcher writes the bundled digits to WORKDIR/data and puts that directory
    # wherever "{data}" appears in ``config`` and ``evaluations``.
    data: str = ""
    # Whether the launcher also scores the row's architecture at random initialisation.
    random_init_reference: bool = False

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.table} has no row {name!r}; rows: {[r.name for r in self.rows]}")


def load_module(path: str, name: str):
    """Imports a Python file by path (study and config modules are files, like --config's)."""
    file = epath.Path(path)
    if not file.exists():
        raise FileNotFoundError(f"no such module file: {path}")
    spec = importlib.util.spec_from_file_location(name, str(file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_study(path: str) -> Study:
    module = load_module(path, f"byol_flax_study_{epath.Path(path).stem}")
    study = getattr(module, "STUDY", None)
    if not isinstance(study, Study):
        raise ValueError(f"{path} defines no STUDY = byol_flax.studies.study.Study(...)")
    return study


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``"path.py[:arg]"`` -> ``get_config(arg)``, locked (what ``--config=`` does)."""
    path, _, arg = spec.partition(":")
    module = load_module(path, f"byol_flax_config_{epath.Path(path).stem}")
    config = module.get_config(arg or None)
    config.lock()
    return config


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any, *, origin: str) -> None:
    """``config[a][b][c] = value`` for ``key = "a.b.c"``; unknown keys are an error naming
    ``origin`` (the study row) instead of a silently ignored override."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise KeyError(f"{origin}: override {key!r}: no config section {part!r}")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"{origin}: override {key!r}: no config key {leaf!r} in {list(node)}")
    node[leaf] = value


def row_config(study: Study, row: Row, seed: int,
               extra: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The pre-training config of one row and seed."""
    config = load_config(study.config)
    for source, overrides in ((study.table, study.overrides), (f"{study.table} row {row.name}",
                                                                row.overrides),
                              ("--set", extra or {})):
        for key, value in overrides.items():
            set_dotted(config, key, value, origin=source)
    config.seed = seed
    return config


def _flag_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def run_dir(workdir: str, row: Row, seed: int) -> str:
    return f"{workdir}/{row.name}/seed_{seed}"


def commands(study: Study, workdir: str, *, seeds: Sequence[int] | None = None,
             extra: Mapping[str, Any] | None = None,
             eval_extra: Mapping[str, Any] | None = None) -> list[str]:
    """Shell commands making the whole table: pre-training then evaluation per row and seed."""
    out = []
    for row in study.rows:
        for seed in seeds or study.seeds:
            directory = run_dir(workdir, row, seed)
            overrides = {**study.overrides, **row.overrides, **(extra or {}), "seed": seed}
            flags = [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
            out.append(shlex.join(["python", "-m", "byol_flax.main", f"--config={study.config}",
                                   *flags, f"--workdir={directory}"]))
            for evaluation in study.evaluations:
                eval_flags = [f"--config.{k}={_flag_value(v)}" for k, v in
                              {**(eval_extra or {}), "seed": seed}.items()]
                out.append(shlex.join([
                    "python", "-m", "byol_flax.evaluation", f"--config={evaluation}", *eval_flags,
                    f"--source={directory}", f"--workdir={directory}/{eval_dir_name(evaluation)}"]))
    return out


def eval_dir_name(evaluation: str) -> str:
    """``byol_flax/configs/eval_digits.py:knn,data=X`` -> ``eval_knn``: one directory per protocol."""
    _, _, arg = evaluation.partition(":")
    return "eval_" + (arg.split(",")[0] if arg else epath.Path(evaluation.partition(":")[0]).stem)


def with_data(study: Study, data_dir: str) -> Study:
    """The study with "{data}" replaced by ``data_dir`` in its config and evaluation specs."""
    return dataclasses.replace(
        study, config=study.config.replace("{data}", data_dir),
        evaluations=tuple(e.replace("{data}", data_dir) for e in study.evaluations))
