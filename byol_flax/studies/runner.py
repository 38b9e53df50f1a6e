"""The study runner: ``python -m byol_flax.studies --study=NAME --workdir=DIR [--print]``.

One workflow for every study (the paper's tables, the CPU replications, the demo): a plan of
(row, seed) runs, each a pre-training and the study's evaluations of its encoder, optionally
with reference encoders (random initialisation, raw pixels) scored the same way. ``--print``
writes one shell command per pre-training and evaluation (for a cluster: each line is an
ordinary ``byol_flax.main`` / ``byol_flax.evaluation`` run); without it the runs happen here one
after the other, in-process, with one ETA line per run, a persistent compilation cache shared
by all of them (the train step compiles once) and the bundled digits written once; finished
pre-trainings are read back from their ``final_metrics.json``. Afterwards ``summary.json``,
``summary.md`` and ``summary.png`` (:mod:`byol_flax.studies.summary`) land in the workdir.
``--smoke`` puts ``smoke=True`` in every config spec (seconds-long runs, same code paths).
A bad flag (study, row, seed, override key) or workdir is one line naming it
(:func:`byol_flax.runtime.commands.run_command`).

Examples::

    python -m byol_flax.studies --study=table21 --workdir=gs://B/t21 \\
        --set=data.dir=gs://B/imagenet --eval_set=data.dir=gs://B/imagenet --print
    python -m byol_flax.studies --study=cpu_collapse --workdir=workdirs/cpu_collapse
"""

import ast
import dataclasses
import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from etils import epath

from byol_flax.config import training_steps
from byol_flax.data.convert import digits
from byol_flax.data.records import MANIFEST_NAME, DataError
from byol_flax.runtime import console, logs
from byol_flax.runtime.commands import CommandLineError, run_command
from byol_flax.runtime.outputs import claim_output_dir
from byol_flax.runtime.xla import configure_xla_flags
from byol_flax.storage import files, json_files
from byol_flax.studies import summary as summaries
from byol_flax.studies.study import (
    REFERENCES,
    Row,
    Study,
    eval_config,
    eval_dir_name,
    load_study,
    row_config,
    run_dir,
    with_data,
    with_smoke,
)

# Images of the 1797 digits held out from train for choosing hyper-parameters (the test split
# keeps byol_flax.data.convert.digits' default of 360).
HOLDOUT_COUNT = 150


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run: ``name`` is its result key and directory (``eval_linear``,
    ``random_init_eval_knn``, ``pixels_eval_linear``)."""

    name: str
    spec: str
    config: ml_collections.ConfigDict
    source: str
    workdir: str


@dataclasses.dataclass(frozen=True)
class Run:
    """One (row, seed): its pre-training config and workdir, and its evaluations."""

    row: Row
    seed: int
    workdir: str
    config: ml_collections.ConfigDict
    evaluations: tuple[Evaluation, ...]


def plan(study: Study, workdir: str, *, seeds: Sequence[int] | None = None,
         extra: Mapping[str, Any] | None = None,
         eval_extra: Mapping[str, Any] | None = None) -> list[Run]:
    """Every (row, seed) of ``study`` under ``workdir``, with all its configs (both what
    ``--print`` writes and what runs here)."""
    names = [eval_dir_name(spec) for spec in study.evaluations]
    for reference, scored in study.references.items():
        if reference not in REFERENCES or not set(scored) <= set(names):
            raise ValueError(f"{study.table}: references {{{reference!r}: {scored}}}: a "
                             f"reference is one of {REFERENCES}, scored by evaluations of {names}")
    runs = []
    for row in study.rows:
        for seed in seeds or study.seeds:
            directory = run_dir(workdir, row, seed)
            config = row_config(study, row, seed, extra)
            references = study.references if study.references_every_run or not runs else {}
            evaluations = []
            for spec, name in zip(study.evaluations, names):
                evaluation = eval_config(spec, config, seed, eval_extra)
                for reference in ["", *(r for r, scored in references.items() if name in scored)]:
                    key = f"{reference}_{name}" if reference else name
                    evaluations.append(Evaluation(key, spec, evaluation,
                                                  _source(reference, directory),
                                                  f"{directory}/{key}"))
            runs.append(Run(row, seed, directory, config, tuple(evaluations)))
    return runs


def _source(reference: str, directory: str) -> str:
    """What an evaluation of the run in ``directory`` scores: its encoder ("") or a reference."""
    from byol_flax.weights.encoder import PIXELS_SOURCE, RANDOM_PREFIX  # noqa: PLC0415

    return {"": directory, "random_init": RANDOM_PREFIX + directory,
            "pixels": PIXELS_SOURCE}[reference]


def commands(study: Study, workdir: str, *, seeds: Sequence[int] | None = None,
             extra: Mapping[str, Any] | None = None,
             eval_extra: Mapping[str, Any] | None = None) -> list[str]:
    """Shell commands making the whole study: data, then pre-training and evaluations per run."""
    out = []
    if study.data == "digits":
        data_dir = f"{workdir}/data"
        out.append(shlex.join(["python", "-m", "byol_flax.data.convert.digits", "--out", data_dir,
                               "--holdout-count", str(HOLDOUT_COUNT)]))
        study = with_data(study, data_dir)
    for run in plan(study, workdir, seeds=seeds, extra=extra, eval_extra=eval_extra):
        overrides = {**study.overrides, **run.row.overrides, **(extra or {}), "seed": run.seed}
        out.append(shlex.join(["python", "-m", "byol_flax.main",
                               f"--config={run.row.config or study.config}",
                               *_flags(overrides), f"--workdir={run.workdir}"]))
        for evaluation in run.evaluations:
            overrides = {"data.image_size": run.config.data.image_size, **(eval_extra or {}),
                         "seed": run.seed}
            out.append(shlex.join(["python", "-m", "byol_flax.evaluation",
                                   f"--config={evaluation.spec}", *_flags(overrides),
                                   f"--source={evaluation.source}",
                                   f"--workdir={evaluation.workdir}"]))
    return out


def _flags(overrides: Mapping[str, Any]) -> list[str]:
    def value(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        return str(v)

    return [f"--config.{key}={value(v)}" for key, v in overrides.items()]


def enable_compilation_cache(directory: epath.Path) -> str | None:
    """JAX's persistent compilation cache: every run of a study runs the same programs (only
    values differ), so the train step compiles once per study, not once per run (~40 s each on
    a 2-core CPU), and a re-run compiles nothing. Returns the previous cache directory."""
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return previous


def prepare_data(workdir: epath.Path) -> str:
    """Converts the bundled digits into ``workdir/data`` once; returns that directory."""
    data_dir = workdir / "data"
    if not (data_dir / MANIFEST_NAME).exists():
        if digits.main(["--out", str(data_dir), "--holdout-count", str(HOLDOUT_COUNT),
                        "--no-progress"]):  # it printed why
            raise DataError(f"the bundled digits could not be converted into {data_dir}")
    return str(data_dir)


def run(study: Study, workdir: epath.PathLike, *, seeds: Sequence[int] | None = None,
        extra: Mapping[str, Any] | None = None,
        eval_extra: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Runs every (row, seed) of ``study`` here; returns one JSON-able record per run: ``row``,
    ``seed``, ``dir``, ``steps``, ``train_seconds``, ``final_metrics``, ``config``,
    ``eval_configs`` (by evaluation) and ``evaluations`` (every result, by name)."""
    started = time.perf_counter()
    workdir = absolute_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if study.data == "digits":
        study = with_data(study, prepare_data(workdir))
        console.stage("data: scikit-learn's 1797 8x8 digits as ArrayRecord shards in %s",
                      workdir / "data")
    previous_cache = enable_compilation_cache(workdir / "jax_cache")
    records = []
    try:
        runs = plan(study, str(workdir), seeds=seeds, extra=extra, eval_extra=eval_extra)
        for index, one in enumerate(runs):
            elapsed = time.perf_counter() - started
            eta = f"; ETA {elapsed / index * (len(runs) - index) / 60:.1f} min" if index else ""
            console.stage("run %d of %d: %s, seed %d (%.1f min elapsed%s)", index + 1,
                          len(runs), one.row.name, one.seed, elapsed / 60, eta)
            records.append(_run_one(one))
    finally:
        jax.config.update("jax_compilation_cache_dir", previous_cache)
    return records


def absolute_workdir(workdir: epath.PathLike) -> epath.Path:
    """A local workdir made absolute (Orbax wants absolute paths); ``gs://`` left as it is."""
    return epath.Path(workdir).absolute() if "://" not in str(workdir) else epath.Path(workdir)


def _run_one(one: Run) -> dict[str, Any]:
    """Pre-trains (or reads back a finished pre-training) and evaluates one run."""
    # Imported here: TensorFlow comes with them (through CLU), and --print needs none.
    from byol_flax.data.pipeline import open_split  # noqa: PLC0415
    from byol_flax.evaluation.runner import evaluate  # noqa: PLC0415
    from byol_flax.train import train_and_evaluate  # noqa: PLC0415

    started = time.perf_counter()
    final = train_and_evaluate(one.config, one.workdir) or json_files.read(  # finished earlier
        epath.Path(one.workdir) / "final_metrics.json", spec=dict, what="final metrics")
    steps, _ = training_steps(one.config, open_split(one.config.data, "train").num_records)
    record = {"row": one.row.name, "seed": one.seed, "dir": one.workdir, "steps": steps,
              "train_seconds": time.perf_counter() - started, "final_metrics": final,
              "projection_size": one.config.model.projector.output_size,
              "config": json.loads(one.config.to_json_best_effort()),
              "eval_configs": {e.name: json.loads(e.config.to_json_best_effort())
                               for e in one.evaluations if e.source == one.workdir},
              "evaluations": {}}
    for evaluation in one.evaluations:
        result = evaluate(evaluation.config, evaluation.source, evaluation.workdir)
        record["evaluations"][evaluation.name] = result
        metric, value = next(iter(result["test"].items()))
        console.stage("  %-24s test %s %.3f (chosen on %s: %s)", evaluation.name, metric, value,
                      result["selection_split"], json.dumps(result["selected"]))
    return record


def run_study(study: Study, workdir: epath.PathLike, **kwargs: Any) -> dict[str, Any]:
    """:func:`run`, then the summary (``summary.json/md/png`` in ``workdir``); returns it."""
    started = time.perf_counter()
    records = run(study, workdir, **kwargs)
    return summaries.write_summary(study, absolute_workdir(workdir), records,
                                   total_seconds=time.perf_counter() - started)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> {"a.b": 1, "c": "x"} (Python literals, else strings)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise CommandLineError(f"override {item!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def select_rows(study: Study, names: Sequence[str]) -> Study:
    if not names:
        return study
    try:
        return dataclasses.replace(study, rows=tuple(study.row(name) for name in names))
    except KeyError as error:  # Study.row: the study has no such row (the message says which)
        raise CommandLineError(f"--rows: {error.args[0]}") from error


# The command's own flags (run_command): importing this module (the demo, tests) defines
# no global absl flag.
COMMAND_FLAGS = flags.FlagValues()
_STUDY = flags.DEFINE_string(
    "study", None, "a study's name (table21, cpu_collapse: byol_flax/configs/studies/) or the "
    "path of a study module", flag_values=COMMAND_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "root of the runs: WORKDIR/<row>/seed_<s>",
                               flag_values=COMMAND_FLAGS)
_PRINT = flags.DEFINE_boolean("print", False, "print the commands, run nothing",
                              flag_values=COMMAND_FLAGS)
_ROWS = flags.DEFINE_string("rows", "", "comma-separated rows (empty: all)",
                            flag_values=COMMAND_FLAGS)
_SEEDS = flags.DEFINE_string("seeds", "", "comma-separated seeds (empty: the study's)",
                             flag_values=COMMAND_FLAGS)
_SET = flags.DEFINE_multi_string("set", [], "pre-training override KEY=VALUE",
                                 flag_values=COMMAND_FLAGS)
_EVAL_SET = flags.DEFINE_multi_string("eval_set", [], "evaluation override KEY=VALUE",
                                      flag_values=COMMAND_FLAGS)
_SMOKE = flags.DEFINE_boolean("smoke", False,
                              "every config at smoke size (smoke=True: seconds-long runs)",
                              flag_values=COMMAND_FLAGS)
_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "also print every log line (they always go to WORKDIR/log.txt)",
    flag_values=COMMAND_FLAGS)
flags.mark_flags_as_required(["study", "workdir"], flag_values=COMMAND_FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    """``byol-study``: the arguments of ``sys.argv`` (exits), or ``argv`` in this process (returns
    the exit status; :func:`byol_flax.runtime.commands.run_command`)."""
    return run_command(_main, __name__, flag_values=COMMAND_FLAGS, argv=argv)


def _main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = _WORKDIR.value
    study = select_rows(load_study(_STUDY.value), [r for r in _ROWS.value.split(",") if r])
    study = with_smoke(study) if _SMOKE.value else study
    try:
        seeds = [int(s) for s in _SEEDS.value.split(",") if s] or None
    except ValueError as error:
        raise CommandLineError(f"--seeds={_SEEDS.value}: not integers") from error
    overrides = {"seeds": seeds, "extra": parse_overrides(_SET.value),
                 "eval_extra": parse_overrides(_EVAL_SET.value)}
    try:  # every config of the plan, built before anything is written or printed
        plan(study, workdir, **overrides)
    except KeyError as error:  # set_dotted: an override naming no config key (says which)
        raise CommandLineError(error.args[0] if error.args else str(error)) from error
    if _PRINT.value:
        print("\n".join(commands(study, workdir, **overrides)))
        return 0
    configure_xla_flags()  # before the first computation
    claim_output_dir(workdir, "study")  # a user's folder is refused before the log lands
    try:
        logs.setup(workdir, verbose=_VERBOSE.value)
    except OSError as error:
        raise CommandLineError(f"--workdir={workdir}: cannot write there: "
                                       f"{error}") from error
    summary = run_study(study, workdir, **overrides)
    print(files.read_text(summary["summary_md"], what="study summary"))
    print(json.dumps({"table": summary["table"], "rows": {
        r["row"]: {"collapsed": r["collapsed"], **{k: v["mean"] for k, v in r["ours"].items()}}
        for r in summary["rows"]}, "total_seconds": summary["total_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
