"""The study launcher: ``python -m byol_flax.studies --study=byol_flax/configs/studies/<table>.py``.

``--print`` writes one shell command per pre-training and evaluation of every row and seed (for a
cluster: each line is an ordinary ``byol_flax.main`` / ``byol_flax.evaluate`` run); without it
the rows run here one after the other, in-process (the train step and compilation cache are
shared), resuming finished runs. Afterwards ``summary.json``, ``summary.md`` (our result beside
the paper's for every row, with the collapse monitors) and ``summary.png`` land in the workdir.

Examples::

    python -m byol_flax.studies --study=byol_flax/configs/studies/table21.py --workdir=gs://B/t21 \\
        --set=data.dir=gs://B/imagenet --eval_set=data.dir=gs://B/imagenet --print
    python -m byol_flax.studies --study=byol_flax/configs/studies/cpu_collapse.py \\
        --workdir=workdirs/cpu_collapse
"""

import argparse
import ast
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from etils import epath

from byol_flax.studies import study as studies
from byol_flax.studies.local_runs import enable_compilation_cache, prepare_data
from byol_flax.studies.report import read_scalars
from byol_flax.runtime.xla import configure_xla_flags

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Collapse verdicts. "complete": the monitor's warning threshold (config.logging.
# collapse_warning_fraction), batch std of l2-normalised projections below 0.2 x 1/sqrt(d);
# "dimensional": the projections span few directions, effective rank below 10% of d.
COLLAPSE_STD_RATIO = 0.2
DIMENSIONAL_COLLAPSE_RANK_FRACTION = 0.1
MONITORS = ("collapse/projection_std_ratio", "collapse/projection_effective_rank",
            "collapse/representation_std_ratio")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> {"a.b": 1, "c": "x"} (Python literals, else strings)."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def select_rows(study: studies.Study, names: Sequence[str]) -> studies.Study:
    if not names:
        return study
    return dataclasses.replace(study, rows=tuple(study.row(name) for name in names))


def prepare(study: studies.Study, workdir: epath.Path) -> studies.Study:
    if study.data == "digits":
        return studies.with_data(study, prepare_data(workdir))
    return study


def _first_top1(test: Mapping[str, float]) -> float | None:
    keys = sorted(k for k in test if k.startswith("top1"))
    return test[keys[0]] if keys else None


def run_study(study: studies.Study, workdir: epath.PathLike, *,
              seeds: Sequence[int] | None = None, extra: Mapping[str, Any] | None = None,
              eval_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Runs every row and seed here, then writes and returns the summary."""
    from byol_flax.export.encoder import RANDOM_PREFIX  # noqa: PLC0415
    from byol_flax.evaluation.runner import evaluate  # noqa: PLC0415
    from byol_flax.train import train_and_evaluate  # noqa: PLC0415

    workdir = epath.Path(workdir).absolute() if "://" not in str(workdir) else epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    study = prepare(study, workdir)
    previous_cache = enable_compilation_cache(workdir / "jax_cache")
    runs = []
    started = time.perf_counter()
    try:
        plan = [(row, seed) for row in study.rows for seed in seeds or study.seeds]
        for index, (row, seed) in enumerate(plan):
            logging.info("sweep %s: run %d of %d (%s, seed %d), %.1f min elapsed", study.table,
                         index + 1, len(plan), row.name, seed,
                         (time.perf_counter() - started) / 60)
            directory = studies.run_dir(str(workdir), row, seed)
            config = studies.row_config(study, row, seed, extra)
            run_started = time.perf_counter()
            final = train_and_evaluate(config, directory) or json.loads(
                (epath.Path(directory) / "final_metrics.json").read_text())
            run = {"row": row.name, "seed": seed, "dir": directory,
                   "projection_size": config.model.projector.output_size,
                   "train_seconds": time.perf_counter() - run_started,
                   "monitors": {k: final.get(k) for k in MONITORS}, "loss": final.get("loss"),
                   "evaluations": {}}
            sources = {"": directory}
            if study.random_init_reference and index == 0:
                sources["random_init_"] = RANDOM_PREFIX + directory
            for evaluation in study.evaluations:
                eval_config = studies.load_config(evaluation)
                for key, value in {**(eval_extra or {}), "seed": seed}.items():
                    studies.set_dotted(eval_config, key, value, origin="--eval_set")
                for prefix, source in sources.items():
                    name = prefix + studies.eval_dir_name(evaluation)
                    result = evaluate(eval_config, source, f"{directory}/{name}")
                    run["evaluations"][name] = result["test"]
            runs.append(run)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous_cache)
    return write_summary(study, workdir, runs, total_seconds=time.perf_counter() - started)


def summarise_rows(study: studies.Study, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: mean and half-range over seeds (the paper's "±") of every score and monitor."""
    rows = []
    for row in study.rows:
        mine = [r for r in runs if r["row"] == row.name]
        if not mine:
            continue
        scores: dict[str, list[float]] = {}
        for run in mine:
            for name, test in run["evaluations"].items():
                if not name.startswith("random_init_") and _first_top1(test) is not None:
                    scores.setdefault(name, []).append(100 * _first_top1(test))
            for key, value in run["monitors"].items():
                if value is not None:
                    scores.setdefault(key, []).append(value)
        stats = {k: {"mean": float(np.mean(v)), "half_range": float(np.ptp(v) / 2),
                     "per_seed": v} for k, v in scores.items()}
        rows.append({
            "row": row.name, "overrides": dict(row.overrides), "paper_top1": row.paper_top1,
            "paper_top5": row.paper_top5, "paper_spread": row.paper_spread,
            "paper_note": row.note, "seeds": [r["seed"] for r in mine], "ours": stats,
            "collapsed": collapse_verdict(stats, mine[0].get("projection_size")),
        })
    return rows


def collapse_verdict(stats: Mapping[str, Any], projection_size: int | None) -> str | None:
    """"complete", "dimensional" or "no" from the seed-averaged final monitors."""
    std_ratio = stats.get("collapse/projection_std_ratio", {}).get("mean")
    rank = stats.get("collapse/projection_effective_rank", {}).get("mean")
    if std_ratio is None:
        return None
    if std_ratio < COLLAPSE_STD_RATIO:
        return "complete"
    if rank is not None and projection_size and \
            rank < DIMENSIONAL_COLLAPSE_RANK_FRACTION * projection_size:
        return "dimensional"
    return "no"


def _cell(stat: Mapping[str, Any] | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    spread = f" ± {stat['half_range']:.{digits}f}" if len(stat["per_seed"]) > 1 else ""
    return f"{stat['mean']:.{digits}f}{spread}"


def markdown_table(study: studies.Study, rows: Sequence[dict[str, Any]],
                   references: Mapping[str, float]) -> str:
    eval_names = sorted({k for r in rows for k in r["ours"] if k.startswith("eval_")})
    header = (["row", "paper top-1"] + [f"ours {n.removeprefix('eval_')} top-1" for n in eval_names]
              + ["proj. std x sqrt(d)", "proj. eff. rank", "collapsed (ours)", "paper"])
    lines = [f"# {study.table}: {study.description}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        paper = "-" if r["paper_top1"] is None else (
            f"{r['paper_top1']}" + (f" ± {r['paper_spread']}" if r["paper_spread"] else ""))
        cells = [r["row"], paper] + [_cell(r["ours"].get(n)) for n in eval_names] + [
            _cell(r["ours"].get("collapse/projection_std_ratio"), 3),
            _cell(r["ours"].get("collapse/projection_effective_rank"), 1),
            r["collapsed"] or "-", r["paper_note"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    if references:
        lines += ["", "Random-initialisation reference (same architecture, seed of the first run): "
                  + ", ".join(f"{k.removeprefix('random_init_eval_')} {v:.1f}"
                              for k, v in references.items())]
    lines += ["", f"Collapsed (ours), from the final training monitors: `complete` when the batch "
              f"std of l2-normalised projections is below {COLLAPSE_STD_RATIO} x 1/sqrt(d) (the "
              "monitor's warning threshold), `dimensional` when their effective rank is below "
              f"{DIMENSIONAL_COLLAPSE_RANK_FRACTION:.0%} of d. Scores are test top-1 in %, mean ± "
              "half the range over seeds (the paper's ±)."]
    return "\n".join(lines) + "\n"


def plot_summary(study: studies.Study, runs: Sequence[dict[str, Any]],
                 rows: Sequence[dict[str, Any]], path: epath.Path) -> None:
    """Left: the projection-collapse monitor over training per row; right: accuracies."""
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for index, row in enumerate(rows):
        color = plt.cm.tab10(index % 10)
        for run in (r for r in runs if r["row"] == row["row"]):
            scalars = read_scalars(run["dir"])
            if "collapse/projection_std_ratio" in scalars:
                steps, values = scalars["collapse/projection_std_ratio"]
                curves.plot(steps, values, color=color,
                            label=row["row"] if run["seed"] == row["seeds"][0] else None)
    curves.axhline(COLLAPSE_STD_RATIO, color="k", linestyle=":", label="collapse threshold")
    curves.set(xlabel="step", ylabel="batch std of normalised projections x sqrt(d)",
               title="collapse monitor", yscale="log")
    curves.legend(fontsize=7)
    eval_names = sorted({k for r in rows for k in r["ours"] if k.startswith("eval_")})
    width = 0.8 / max(len(eval_names), 1)
    x = np.arange(len(rows))
    for j, name in enumerate(eval_names):
        means = [r["ours"].get(name, {}).get("mean", np.nan) for r in rows]
        bars.bar(x + j * width, means, width, label=f"ours: {name.removeprefix('eval_')}")
    paper = [r["paper_top1"] if r["paper_top1"] is not None else np.nan for r in rows]
    bars.scatter(x + 0.4 - width / 2, paper, color="k", marker="_", s=300, zorder=3,
                 label="paper (ImageNet top-1)")
    bars.set_xticks(x + 0.4 - width / 2, [r["row"] for r in rows], rotation=40, ha="right",
                    fontsize=7)
    bars.set(ylabel="test top-1 (%)", title=f"{study.table}: accuracy", ylim=(0, 100))
    bars.legend(fontsize=7)
    figure.tight_layout()
    with path.open("wb") as f:
        figure.savefig(f, dpi=120)
    plt.close(figure)


def write_summary(study: studies.Study, workdir: epath.Path, runs: Sequence[dict[str, Any]], *,
                  total_seconds: float) -> dict[str, Any]:
    rows = summarise_rows(study, runs)
    references = {k: 100 * _first_top1(v) for r in runs for k, v in r["evaluations"].items()
                  if k.startswith("random_init_")}
    summary = {"table": study.table, "description": study.description, "rows": rows,
               "random_init_reference": references, "runs": list(runs),
               "total_seconds": total_seconds, "device": jax.devices()[0].device_kind,
               "summary_md": str(workdir / "summary.md"), "plot": str(workdir / "summary.png")}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    (workdir / "summary.md").write_text(markdown_table(study, rows, references))
    plot_summary(study, runs, rows, workdir / "summary.png")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m byol_flax.studies",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True,
                        help="study module (byol_flax/configs/studies/<name>.py)")
    parser.add_argument("--workdir", required=True, help="root of the runs: WORKDIR/<row>/seed_<s>")
    parser.add_argument("--print", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--rows", default="", help="comma-separated rows (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: the study's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="pre-training override (repeatable)")
    parser.add_argument("--eval_set", action="append", default=[], metavar="KEY=VALUE",
                        help="evaluation override (repeatable)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI (argparse, not absl flags: importing this module defines no global flags)."""
    args = build_parser().parse_args(argv)
    configure_xla_flags()  # before the first computation
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    study = select_rows(studies.load_study(args.study), [r for r in args.rows.split(",") if r])
    seeds = [int(s) for s in args.seeds.split(",") if s] or None
    extra, eval_extra = parse_overrides(args.set), parse_overrides(args.eval_set)
    if args.print:
        if study.data == "digits":
            data_dir = f"{args.workdir}/data"
            print(f"python -m byol_flax.data.convert.digits --out {data_dir} --holdout-count 150")
            study = studies.with_data(study, data_dir)
        print("\n".join(studies.commands(study, args.workdir, seeds=seeds, extra=extra,
                                         eval_extra=eval_extra)))
        return 0
    summary = run_study(study, args.workdir, seeds=seeds, extra=extra, eval_extra=eval_extra)
    print((epath.Path(summary["summary_md"])).read_text())
    print(json.dumps({"table": summary["table"], "rows": {
        r["row"]: {"collapsed": r["collapsed"], **{k: v["mean"] for k, v in r["ours"].items()}}
        for r in summary["rows"]}, "total_seconds": summary["total_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
