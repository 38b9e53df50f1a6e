"""Studies as data: one :class:`Study` per paper table (and the demo), rows = config overrides.

A study module (``byol_flax/configs/studies/table21.py`` etc.) registers in :data:`STUDIES` a
function returning its :class:`Study`: the config every row starts from, the evaluations that score
it, the seeds, and one :class:`Row` per line of the paper's table with the overrides that make it
and the value the paper reports. The runner (``python -m byol_flax.studies``,
:mod:`byol_flax.studies.runner`) prints the commands of a study for a cluster or runs it here.
Config specs are what ``--config=`` takes: a shipped config's name (``byol_imagenet_300ep:r50x1``,
resolved by :func:`byol_flax.runtime.config_names.resolve`) or a path.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from etils import epath

from byol_flax.config import set_dotted
from byol_flax.errors import UserError
from byol_flax.runtime import config_names
from byol_flax.runtime.config_names import load_config, load_module
from byol_flax.runtime.registry import Registry

# The setup of Section 5 and Appendix G (300 epochs, LR 0.3, WD 1e-6, tau 0.99, batch 4096).
SECTION5_CONFIG = "byol_imagenet_300ep:r50x1"
# Reference encoders a study may score with its evaluations, beside each run's BYOL encoder:
# the run's architecture at random initialisation (seeded like the run) and raw pixels.
REFERENCES = ("random_init", "pixels")


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a table: its config overrides and the paper's result (None: not reported)."""

    name: str
    overrides: Mapping[str, Any]
    paper_top1: float | None
    paper_top5: float | None = None
    paper_spread: float | None = None  # the paper's "±": half the max-min range over seeds
    note: str = ""
    config: str = ""  # this row's config spec instead of the study's (the demo's recipes)


@dataclasses.dataclass(frozen=True)
class Study:
    table: str
    description: str
    rows: tuple[Row, ...]
    config: str = SECTION5_CONFIG  # "NAME[:ARG]" or "path.py[:ARG]", as --config takes it
    # Evaluation configs scoring every run (same form); the first is the table's metric.
    evaluations: tuple[str, ...] = ("eval_imagenet:linear",)
    seeds: tuple[int, ...] = (0, 1, 2)  # Appendix G: "averaged over 3 seeds"
    # Study-level overrides applied before every row's (e.g. a shared data directory).
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # "digits": the runner writes the bundled digits to WORKDIR/data and puts that directory
    # wherever "{data}" appears in the config specs.
    data: str = ""
    # Reference (one of REFERENCES) -> the evaluations (by eval_dir_name) that score it.
    references: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # False: only the first run gets the references (one line under the table); True: every
    # run does (the demo: the references' spread over seeds, per recipe).
    references_every_run: bool = False

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"{self.table} has no row {name!r}; rows: {[r.name for r in self.rows]}")


class StudyError(UserError, ValueError):
    """A study module or name does not give one study (the message names the file)."""


# Name -> function returning the Study; a study module registers its function on import.
STUDIES: Registry[Callable[[], Study]] = Registry("study")


def load_study(spec: str) -> Study:
    """A registered study: ``NAME`` (a shipped study module of that name is imported first),
    ``path/to/module.py`` (the one study it registers) or ``path/to/module.py:NAME``."""
    if spec not in STUDIES:
        path, _, name = config_names.resolve(spec, subdir="studies").partition(":")
        module = load_module(path, f"byol_flax_study_{epath.Path(path).stem}")
        registered = [n for n in STUDIES if STUDIES.get(n).__module__ == module.__name__]
        if name or spec not in STUDIES:
            if not name and len(registered) != 1:
                raise StudyError(f"{path} registers {len(registered)} studies {registered}; "
                                 f"name one with --study={path}:NAME")
            spec = name or registered[0]
    study = STUDIES.get(spec)()
    if not isinstance(study, Study):
        raise StudyError(f"study {spec!r} returned {type(study).__name__}, not a Study")
    return study


def row_config(study: Study, row: Row, seed: int,
               extra: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The pre-training config of one row and seed."""
    config = load_config(row.config or study.config)
    for source, overrides in ((study.table, study.overrides), (f"{study.table} row {row.name}",
                                                                row.overrides),
                              ("--set", extra or {})):
        for key, value in overrides.items():
            set_dotted(config, key, value, origin=source)
    config.seed = seed
    return config


def eval_config(spec: str, pretrain: ml_collections.ConfigDict, seed: int,
                extra: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The evaluation config ``spec`` for a run of ``pretrain``: at the pre-training's crop size
    (an encoder is scored at the resolution it learned), then ``extra``, then the run's seed."""
    config = load_config(spec)
    config.data.image_size = pretrain.data.image_size
    for key, value in (extra or {}).items():
        set_dotted(config, key, value, origin="--eval_set")
    config.seed = seed
    return config


def run_dir(workdir: str, row: Row, seed: int) -> str:
    return f"{workdir}/{row.name}/seed_{seed}"


# Options of an evaluation spec that say where and how large, not what is measured: they do not
# name its directory.
UNNAMED_EVAL_OPTIONS = ("data", "image_size", "smoke")


def eval_dir_name(evaluation: str) -> str:
    """``eval_digits:knn,data=X`` -> ``eval_knn``: one directory per protocol (the argument's
    leading value; without one, the module: ``eval_imagenet:smoke=True`` -> ``eval_imagenet``),
    then the value of every option that changes what is measured
    (``eval_digits:linear,feature_norm=batchnorm`` -> ``eval_linear_batchnorm``)."""
    path, _, arg = evaluation.partition(":")
    parts = [p for p in arg.split(",") if p]
    first = parts[0] if parts and "=" not in parts[0] else \
        epath.Path(path).stem.removeprefix("eval_")
    values = [value for key, _, value in (p.partition("=") for p in parts if "=" in p)
              if key not in UNNAMED_EVAL_OPTIONS]
    return "_".join(["eval", first, *values])


def _specs(study: Study, change: Callable[[str], str]) -> Study:
    """The study with ``change`` applied to every config spec (study, rows, evaluations)."""
    return dataclasses.replace(
        study, config=change(study.config),
        rows=tuple(dataclasses.replace(r, config=change(r.config)) if r.config else r
                   for r in study.rows),
        evaluations=tuple(change(e) for e in study.evaluations))


def with_data(study: Study, data_dir: str) -> Study:
    """The study with "{data}" replaced by ``data_dir`` in its config specs."""
    return _specs(study, lambda spec: spec.replace("{data}", data_dir))


def with_smoke(study: Study) -> Study:
    """The study at smoke size: ``smoke=True`` added to every config spec's argument."""
    return _specs(study, lambda spec: spec + ("," if ":" in spec else ":") + "smoke=True")
