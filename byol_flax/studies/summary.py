"""A study's summary: ``summary.json``, ``summary.md`` (our result beside the paper's for every
row, with the collapse monitors) and ``summary.png``, from the runner's run records."""

import io
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import matplotlib
import numpy as np
from etils import epath

from byol_flax.collapse import (
    COMPLETE_COLLAPSE_STD_RATIO,
    DIMENSIONAL_COLLAPSE_RANK_FRACTION,
    MONITORS,
    collapse_verdict,
)
from byol_flax.studies.report import read_scalars
from byol_flax.studies.study import REFERENCES, Study

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from byol_flax.storage import files, json_files

REFERENCE_PREFIXES = tuple(f"{reference}_" for reference in REFERENCES)
REFERENCE_LABELS = {
    "random_init": "Random-initialisation reference (same architecture, seed of the first run)",
    "pixels": "Raw-pixel reference",
}


def _first_top1(test: Mapping[str, float]) -> float | None:
    keys = sorted(k for k in test if k.startswith("top1"))
    return test[keys[0]] if keys else None


def summarise_rows(study: Study, runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: mean and half-range over seeds (the paper's "±") of every score and monitor."""
    rows = []
    for row in study.rows:
        mine = [r for r in runs if r["row"] == row.name]
        if not mine:
            continue
        scores: dict[str, list[float]] = {}
        for run in mine:
            for name, result in run["evaluations"].items():
                top1 = _first_top1(result["test"])
                if not name.startswith(REFERENCE_PREFIXES) and top1 is not None:
                    scores.setdefault(name, []).append(100 * top1)
            for key in MONITORS:
                if run["final_metrics"].get(key) is not None:
                    scores.setdefault(key, []).append(run["final_metrics"][key])
        stats = {k: {"mean": float(np.mean(v)), "half_range": float(np.ptp(v) / 2),
                     "per_seed": v} for k, v in scores.items()}
        rows.append({
            "row": row.name, "overrides": dict(row.overrides), "paper_top1": row.paper_top1,
            "paper_top5": row.paper_top5, "paper_spread": row.paper_spread,
            "paper_note": row.note, "seeds": [r["seed"] for r in mine], "ours": stats,
            "collapsed": collapse_verdict(stats, mine[0].get("projection_size")),
        })
    return rows


def _cell(stat: Mapping[str, Any] | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    spread = f" ± {stat['half_range']:.{digits}f}" if len(stat["per_seed"]) > 1 else ""
    return f"{stat['mean']:.{digits}f}{spread}"


def markdown_table(study: Study, rows: Sequence[dict[str, Any]],
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
    for reference, label in REFERENCE_LABELS.items():
        mine = {k.removeprefix(f"{reference}_eval_"): v for k, v in references.items()
                if k.startswith(f"{reference}_")}
        if mine:
            lines += ["", f"{label}: " + ", ".join(f"{k} {v:.1f}" for k, v in mine.items())]
    lines += ["", f"Collapsed (ours), from the final training monitors: `complete` when the batch "
              f"std of l2-normalised projections is below {COMPLETE_COLLAPSE_STD_RATIO} "
              "x 1/sqrt(d) (the "
              "monitor's warning threshold), `dimensional` when their effective rank is below "
              f"{DIMENSIONAL_COLLAPSE_RANK_FRACTION:.0%} of d. Scores are test top-1 in %, mean ± "
              "half the range over seeds (the paper's ±)."]
    return "\n".join(lines) + "\n"


def plot_summary(study: Study, runs: Sequence[dict[str, Any]],
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
    curves.axhline(COMPLETE_COLLAPSE_STD_RATIO, color="k", linestyle=":",
                   label="collapse threshold")
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    files.write_bytes(path, buffer.getvalue(), what="plot")


def write_summary(study: Study, workdir: epath.Path, runs: Sequence[dict[str, Any]], *,
                  total_seconds: float) -> dict[str, Any]:
    """Writes summary.json, summary.md and summary.png into ``workdir``; returns the summary."""
    rows = summarise_rows(study, runs)
    references: dict[str, float] = {}  # the first run's, when every run has them
    for run in runs:
        for name, result in run["evaluations"].items():
            top1 = _first_top1(result["test"])
            if name.startswith(REFERENCE_PREFIXES) and top1 is not None:
                references.setdefault(name, 100 * top1)
    summary = {"table": study.table, "description": study.description, "rows": rows,
               **{f"{reference}_reference": {k: v for k, v in references.items()
                                             if k.startswith(f"{reference}_")}
                  for reference in study.references},
               "runs": list(runs),
               "total_seconds": total_seconds, "device": jax.devices()[0].device_kind,
               "summary_md": str(workdir / "summary.md"), "plot": str(workdir / "summary.png")}
    files.write_files({workdir / "summary.json": json_files.dumps(summary, indent=2,
                                                                  default=float),
                       workdir / "summary.md": markdown_table(study, rows, references)},
                      what="study summary")
    plot_summary(study, runs, rows, workdir / "summary.png")
    return summary
