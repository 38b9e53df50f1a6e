"""The demo's report: ``report.json``, ``report.md`` and PNG plots from the runner's run records
(:func:`byol_flax.studies.runner.run`) and the runs' TensorBoard logs.

Every accuracy is kept with its split and seed; summaries are mean, standard deviation and range
over seeds, and the report states plainly, per augmentation recipe, whether BYOL beat each
baseline by more than the seed-to-seed spread.
"""

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from etils import epath
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from byol_flax.storage import files, json_files

HEADLINE_KEYS = ("byol_linear_top1", "random_init_linear_top1", "raw_pixels_linear_top1",
                 "byol_knn_top1", "random_init_knn_top1", "byol_online_classifier_top1",
                 "train_seconds", "seeds")
METHODS = {  # report name -> (evaluation of the run, metric in its test results)
    "byol_linear_top1": ("eval_linear", "top1"),
    "random_init_linear_top1": ("random_init_eval_linear", "top1"),
    "raw_pixels_linear_top1": ("pixels_eval_linear", "top1"),
    "byol_knn_top1": ("eval_knn", "top1_k20"),
    "random_init_knn_top1": ("random_init_eval_knn", "top1_k20"),
    # Beside the paper's protocol: the linear probe on standardised features
    # (linear.feature_norm="batchnorm", the probe ViT work uses), the same for both encoders.
    "byol_linear_bn_top1": ("eval_linear_batchnorm", "top1"),
    "random_init_linear_bn_top1": ("random_init_eval_linear_batchnorm", "top1"),
}
# The official online classifier, trained during pre-training: its last held-out top-1.
ONLINE_CLASSIFIER = "byol_online_classifier_top1"
ONLINE_CLASSIFIER_SCALAR = "online_classifier/top1"
# (BYOL, baseline): BYOL "beats" a baseline when the margin of the means exceeds twice the larger
# seed standard deviation (with one seed there is no spread, and no verdict).
COMPARISONS = (("byol_linear_top1", "raw_pixels_linear_top1"),
               ("byol_linear_top1", "random_init_linear_top1"),
               ("byol_knn_top1", "random_init_knn_top1"),
               ("byol_linear_bn_top1", "random_init_linear_bn_top1"))
BASELINE_LABELS = {
    "raw_pixels_linear_top1": "a linear classifier on raw pixels",
    "random_init_linear_top1": "the same network at random initialisation (linear)",
    "random_init_knn_top1": "the same network at random initialisation (kNN)",
    "random_init_linear_bn_top1": "the same network at random initialisation (linear on "
                                  "standardised features)",
}
# What each comparison's BYOL side is called in the verdict.
BYOL_LABELS = {"byol_linear_top1": "linear", "byol_knn_top1": "kNN",
               "byol_linear_bn_top1": "linear on standardised features"}


def read_scalars(logdir: epath.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar CLU wrote to ``logdir``: tag -> (steps, values)."""
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags().get("tensors", []):
        events = accumulator.Tensors(tag)
        out[tag] = (np.asarray([e.step for e in events]),
                    np.asarray([float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]))
    return out


def summarise(values: dict[int, float]) -> dict[str, Any]:
    array = np.asarray(list(values.values()))
    return {"mean": float(array.mean()), "std": float(array.std()), "min": float(array.min()),
            "max": float(array.max()), "per_seed": {str(k): v for k, v in values.items()}}


def recipe_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, (key, metric) in METHODS.items():
        summary[name] = summarise({r["seed"]: r["evaluations"][key]["test"][metric]
                                   for r in runs})
    online = {r["seed"]: r["final_metrics"][ONLINE_CLASSIFIER_SCALAR] for r in runs
              if ONLINE_CLASSIFIER_SCALAR in r["final_metrics"]}
    if online:
        summary[ONLINE_CLASSIFIER] = summarise(online)
    for byol_key, baseline in COMPARISONS:
        byol, other = summary[byol_key], summary[baseline]
        margin = byol["mean"] - other["mean"]
        twice_std = 2 * max(byol["std"], other["std"])
        summary[f"margin_{byol_key}_over_{baseline}"] = {
            "margin": margin, "twice_seed_std": twice_std, "seeds": len(runs),
            "beats": bool(margin > twice_std) if len(runs) > 1 else None}
    summary["train_seconds"] = float(sum(r["train_seconds"] for r in runs))
    finals = [r["final_metrics"] for r in runs]
    summary["steps"] = int(runs[0]["steps"])
    summary["images_per_second"] = float(np.mean([f.get("images_per_second", 0.0)
                                                  for f in finals]))
    return summary


def _plot_scalars(path: epath.Path, runs: Sequence[dict[str, Any]], panels: Sequence[
        tuple[str, str]], title: str) -> None:
    """One subplot per (tag, label); one line per run."""
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for run in runs:
        scalars = run["scalars"]
        for axis, (tag, label) in zip(axes[0], panels):
            if tag in scalars:
                axis.plot(*scalars[tag], label=f"{run['row']} seed {run['seed']}",
                          linewidth=1)
            axis.set_xlabel("step")
            axis.set_title(label)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_accuracies(path: epath.Path, recipes: dict[str, dict[str, Any]]) -> None:
    figure, axis = plt.subplots(figsize=(8, 3.8))
    names = list(METHODS)
    width = 0.8 / len(recipes)
    for index, (recipe, summary) in enumerate(recipes.items()):
        x = np.arange(len(names)) + index * width
        axis.bar(x, [summary[n]["mean"] for n in names], width, label=recipe, alpha=0.7)
        for xi, name in zip(x, names):
            axis.scatter([xi] * len(summary[name]["per_seed"]),
                         list(summary[name]["per_seed"].values()), color="k", s=8, zorder=3)
    axis.set_xticks(np.arange(len(names)) + width * (len(recipes) - 1) / 2)
    axis.set_xticklabels([n.replace("_top1", "").replace("_", "\n") for n in names], fontsize=8)
    axis.set_ylabel("test top-1 (dots: seeds)")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_embeddings(path: epath.Path, embeddings: dict[str, tuple[np.ndarray, np.ndarray]]
                     ) -> None:
    """t-SNE of test embeddings, one panel per encoder, coloured by class."""
    from sklearn.manifold import TSNE

    figure, axes = plt.subplots(1, len(embeddings), figsize=(5 * len(embeddings), 4.6),
                                squeeze=False)
    for axis, (name, (features, labels)) in zip(axes[0], embeddings.items()):
        perplexity = min(30.0, (len(features) - 1) / 3)
        points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                      random_state=0).fit_transform(features)
        scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6)
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(scatter, ax=axes[0].tolist(), label="class")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _verdict(recipe: str, summary: dict[str, Any]) -> list[str]:
    lines = []
    for byol_key, baseline in COMPARISONS:
        m = summary[f"margin_{byol_key}_over_{baseline}"]
        what = BYOL_LABELS[byol_key]
        label = BASELINE_LABELS[baseline]
        if m["beats"] is None:
            word = "scored above" if m["margin"] > 0 else "**scored below**"
            lines.append(f"- `{recipe}`: BYOL {what} {word} {label} by "
                         f"{100 * m['margin']:+.1f} points (one seed: `--seeds=0,1,2` for the "
                         "spread).")
            continue
        if m["beats"]:
            word = "**beat**"
        elif m["margin"] > 0:
            word = "was ahead of, but **not by more than twice the seed std**,"
        else:
            word = "**did not beat**"
        lines.append(f"- `{recipe}`: BYOL {what} {word} {label}: margin "
                     f"{100 * m['margin']:+.1f} points, twice the seed std "
                     f"{100 * m['twice_seed_std']:.1f}.")
    return lines


def write_report(workdir: epath.Path, runs: Sequence[dict[str, Any]], *,
                 embeddings: dict[str, tuple[np.ndarray, np.ndarray]],
                 export_dir: epath.Path, total_seconds: float, device: str,
                 configs: dict[str, Any], recipe_notes: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Writes report.json, report.md and the plots; returns report.json's content. ``runs``: the
    runner's records, one row per recipe.

    ``recipe_notes``: per recipe, the sentence that says why it scores below the headline recipe
    (shown only when it does).
    """
    for run in runs:
        run["scalars"] = read_scalars(run["dir"])
    recipes = {}
    for run in runs:
        recipes.setdefault(run["row"], []).append(run)
    summaries = {recipe: recipe_summary(rs) for recipe, rs in recipes.items()}
    headline_recipe = runs[0]["row"]
    headline = summaries[headline_recipe]
    plots = {
        "training_curves": ("training_curves.png", lambda p: _plot_scalars(
            p, runs, [("loss", "BYOL loss"), ("learning_rate", "learning rate"), ("tau", "tau")],
            "pre-training")),
        "monitors_over_training": ("monitors_over_training.png", lambda p: _plot_scalars(
            p, runs, [("knn/top1_k20", "kNN top-1 (k=20) on holdout"),
                      (ONLINE_CLASSIFIER_SCALAR, "online classifier top-1 on holdout")],
            "monitors during pre-training")),
        "collapse_monitors": ("collapse_monitors.png", lambda p: _plot_scalars(
            p, runs, [("collapse/projection_std_ratio", "projection std x sqrt(d)"),
                      ("collapse/projection_effective_rank", "projection effective rank"),
                      ("collapse/representation_std_ratio", "representation std x sqrt(d)")],
            "collapse monitors")),
        "accuracies": ("accuracies.png", lambda p: _plot_accuracies(p, summaries)),
        "embeddings_2d": ("embeddings_2d.png", lambda p: _plot_embeddings(p, embeddings)),
    }
    for filename, draw in plots.values():
        draw(workdir / filename)

    def accuracy_rows(run):
        rows = []
        for name, (key, metric) in METHODS.items():
            result = run["evaluations"][key]
            rows.append({"method": name, "value": result["test"][metric],
                         "split": result["test_split"], "seed": run["seed"],
                         "recipe": run["row"], "selected": result["selected"],
                         "selection_split": result["selection_split"]})
        return rows

    notes = []
    for recipe, summary in summaries.items():
        gap = headline["byol_linear_top1"]["mean"] - summary["byol_linear_top1"]["mean"]
        if recipe != headline_recipe and gap > 0 and (recipe_notes or {}).get(recipe):
            notes.append(f"- `{recipe}` scores {100 * gap:.1f} points below `{headline_recipe}` "
                         f"(BYOL linear): {recipe_notes[recipe]}")
    content = {
        **{name: headline[name]["mean"] for name in METHODS},
        ONLINE_CLASSIFIER: headline.get(ONLINE_CLASSIFIER, {}).get("mean"),
        "recipe_notes": notes,
        "train_seconds": float(sum(r["train_seconds"] for r in runs)),
        "total_seconds": total_seconds,
        "seeds": sorted({r["seed"] for r in runs}),
        "headline_recipe": headline_recipe,
        "device": device,
        "recipes": summaries,
        "accuracies": [row for run in runs for row in accuracy_rows(run)],
        "runs": [{"recipe": r["row"], "seed": r["seed"], "steps": r["steps"],
                  "train_seconds": r["train_seconds"], "pretrain_dir": r["dir"],
                  "final_metrics": r["final_metrics"]} for r in runs],
        "export_dir": str(export_dir),
        "plots": {name: filename for name, (filename, _) in plots.items()},
        "configs": configs,
    }
    files.write_files({workdir / "report.json": json_files.dumps(content, indent=2,
                                                                 sort_keys=True),
                       workdir / "report.md": render_markdown(content)}, what="report")
    return content


def render_markdown(content: dict[str, Any]) -> str:
    lines = [
        "# BYOL demo report",
        "",
        f"Device: {content['device']}. Seeds {content['seeds']}. Pre-training took "
        f"{content['train_seconds']:.0f} s in all; the whole demo "
        f"{content['total_seconds']:.0f} s.",
        "Every accuracy is on the `test` split (360 digits), with the hyper-parameter chosen on "
        "`holdout` (150 digits); classifiers are fitted on `train`. The online classifier is "
        "the official implementation's linear layer trained during pre-training on the "
        "stop-gradient representation; its top-1 is on `holdout`.",
        "",
        "## Verdict",
    ]
    for recipe, summary in content["recipes"].items():
        lines += _verdict(recipe, summary)
    lines += content.get("recipe_notes", [])
    lines += ["", "## Accuracies (top-1, mean +- std over seeds [min, max])", "",
              "| recipe | method | mean | std | min | max | per seed |",
              "|---|---|---|---|---|---|---|"]
    for recipe, summary in content["recipes"].items():
        for name in (*METHODS, ONLINE_CLASSIFIER):
            if name not in summary:
                continue
            s = summary[name]
            per_seed = ", ".join(f"{k}: {v:.3f}" for k, v in s["per_seed"].items())
            lines.append(f"| {recipe} | {name} | {s['mean']:.3f} | {s['std']:.3f} | "
                         f"{s['min']:.3f} | {s['max']:.3f} | {per_seed} |")
    lines += ["", "## Pre-training", "",
              "| recipe | steps per run | images/s | seconds (all seeds) |",
              "|---|---|---|---|"]
    for recipe, summary in content["recipes"].items():
        lines.append(f"| {recipe} | {summary['steps']} | {summary['images_per_second']:.0f} | "
                     f"{summary['train_seconds']:.0f} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({filename})" for name, filename in content["plots"].items()]
    lines += ["", "## Files", "",
              f"- Exported encoder and model card: `{content['export_dir']}`",
              "- Per run (`<recipe>/seed_<n>/`): the pre-training (TensorBoard logs, "
              "checkpoints, config.json; its log in the demo's `log.txt`) and one directory per "
              "evaluation with its results.json (`eval_linear`, `eval_linear_batchnorm`, "
              "`eval_knn`, `random_init_eval_*`, `pixels_eval_linear`)",
              "- `report.json`: every number above, with split, seed and chosen hyper-parameter, "
              "and the configs", ""]
    return "\n".join(lines)


def console_table(content: dict[str, Any]) -> str:
    """The verdict for the terminal: one row per recipe, means over seeds, then the verdicts."""
    columns = (*METHODS, ONLINE_CLASSIFIER)
    header = ["recipe", *(c.removesuffix("_top1") for c in columns)]
    rows = []
    for recipe, summary in content["recipes"].items():
        cells = []
        for name in columns:
            s = summary.get(name)
            cells.append("-" if s is None else f"{s['mean']:.3f}" + (
                f"+-{s['std']:.3f}" if len(s["per_seed"]) > 1 else ""))
        rows.append([recipe, *cells])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    render = lambda row: "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths))
    lines = [render(header), *(render(r) for r in rows), ""]
    for recipe, summary in content["recipes"].items():
        lines += [line.replace("**", "").replace("`", "") for line in _verdict(recipe, summary)]
    lines += [n.replace("`", "") for n in content.get("recipe_notes", [])]
    return "\n".join(lines)
