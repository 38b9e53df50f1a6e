"""The sweep that chose the demo's default recipe (docs/demo_calibration.md).

    python benchmarks/demo_calibration.py --workdir workdirs/calibration [--points a,b] \
        [--seeds 0,1,2]

Each point is a recipe of ``byol_flax/configs/digits_cpu.py`` plus dotted pre-training overrides: a
row of the demo's study (``byol_flax.studies.demo.demo_study``), so each (point, seed) pre-trains
and evaluates exactly as the demo does, through the study runner (linear and kNN on the BYOL
encoder and on the same network at random initialisation, linear on raw pixels; fit on train,
choose on holdout, report test). Every finished (point, seed) is kept in the workdir, so a
re-run only adds what is missing; the table is rewritten after each one.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import quiet
from byol_flax.runtime.xla import configure_xla_flags

configure_xla_flags()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402

from byol_flax.configs import eval_digits  # noqa: E402
from byol_flax.evaluation import Context, SweepStore  # noqa: E402
from byol_flax.models.encoders import is_vit  # noqa: E402
from byol_flax.sharding import make_mesh  # noqa: E402
from byol_flax.studies import demo, report, runner  # noqa: E402
from byol_flax.weights.encoder import RANDOM_PREFIX, load_source  # noqa: E402

_R12_W1 = {"data.image_size": 12, "model.encoder.width_multiplier": 1}
_R16_W2 = {"data.image_size": 16, "model.encoder.width_multiplier": 2}
_SCALED_BLUR = {f"augment.{v}.blur_sigma_{m}": s * 16 / 224 for v in ("view1", "view2")
                for m, s in (("min", 0.1), ("max", 2.0))}
_NO_BLUR = {"augment.view1.blur_prob": 0.0, "augment.view2.blur_prob": 0.0}
# The three single changes that raised kNN at 80 epochs: LR 2, tau 0.9, blur scaled to 16 px.
_COMBO = {"optimizer.base_learning_rate": 2.0, "target.base_ema": 0.9, **_SCALED_BLUR}

_VIT = {"model.encoder.name": "vit_micro"}
# AdamW at a peak LR of 1e-3 for batch 128 (base 2e-3 x 128/256), a tenth of training as warm-up
_ADAMW = {"optimizer.kind": "adamw", "optimizer.base_learning_rate": 2e-3,
          "optimizer.weight_decay": 0.05, "training.warmup_epochs": 8.0}


_FROZEN = {"model.encoder.freeze_patch_projection": True}
_BN_FINAL = {"model.encoder.final_norm": "batchnorm"}


def _epochs(epochs: float, size: dict = _R16_W2, **changes) -> dict:
    return {**size, "training.epochs": epochs, **changes}


# name -> (augmentation recipe of digits_cpu, pre-training overrides). The recipe
# small_image is the first demo's setup (12 px, 1x, 40 epochs, LR 1.0, tau 0.99); every point
# is that setup plus its overrides (the paper point names the LR and tau it shares with the
# chosen one).
POINTS: dict[str, tuple[str, dict]] = {
    "r12_w1_e40": ("small_image", _epochs(40.0, _R12_W1)),
    "r16_w2_e80": ("small_image", _epochs(80.0)),
    "r16_w4_e80": ("small_image", _epochs(80.0, {**_R16_W2,
                                                 "model.encoder.width_multiplier": 4})),
    "r16_w2_e160": ("small_image", _epochs(160.0)),
    "r16_w2_e80_b64": ("small_image", _epochs(80.0, **{"training.batch_size": 64})),
    "r16_w2_e80_lr2": ("small_image", _epochs(80.0, **{"optimizer.base_learning_rate": 2.0})),
    "r16_w2_e80_tau09": ("small_image", _epochs(80.0, **{"target.base_ema": 0.9})),
    "r16_w2_e80_lambda10": ("small_image", _epochs(
        80.0, **{"optimizer.predictor_lr_multiplier": 10.0})),
    # Table 6's blur sigma [0.1, 2.0] is in pixels of a 224-px crop; scaled to 16 px it is
    # [0.007, 0.14]. Unscaled, a 2-px sigma blurs an upsampled 8x8 digit away.
    "r16_w2_e80_scaledblur": ("small_image", _epochs(80.0, **_SCALED_BLUR)),
    "r16_w2_e80_noblur": ("small_image", _epochs(80.0, **_NO_BLUR)),
    "r16_w2_e80_combo": ("small_image", _epochs(80.0, **_COMBO)),
    "r16_w2_e80_b64_combo": ("small_image", _epochs(80.0, **{"training.batch_size": 64},
                                                    **_COMBO)),
    "r16_w2_e160_combo": ("small_image", _epochs(160.0, **_COMBO)),
    # Table 6 exactly (8% crops, flips, blur sigma in pixels) on the otherwise chosen setup.
    "r16_w2_e160_combo_paper": ("paper", _epochs(160.0, **{
        "optimizer.base_learning_rate": 2.0, "target.base_ema": 0.9})),
    # A Vision Transformer (vit_micro: 4 blocks, 4 heads, width 64 x 2, 4-px patches, so 16
    # tokens and a class token at 16 px) in place of the ResNet, on the chosen recipe: as it is
    # (LARS), with MoCo v3's optimizer (AdamW, a tenth of training as warm-up) at two peak LRs,
    # at the demo's 160 epochs (the recipe `byol-train --config=digits_cpu
    # --config.model.encoder.name=vit_micro` runs), and with mean pooling.
    "vit_e80": ("digits", _epochs(80.0, **_VIT)),
    "vit_e80_adamw": ("digits", _epochs(80.0, **_VIT, **_ADAMW)),
    "vit_e80_adamw_lr5e-4": ("digits", _epochs(80.0, **_VIT, **{
        **_ADAMW, "optimizer.base_learning_rate": 5e-4})),
    "vit_e160": ("digits", _epochs(160.0, **_VIT)),
    # The representation as the mean of the patch tokens instead of the class token.
    "vit_e80_mean": ("digits", _epochs(80.0, **_VIT, **{"model.encoder.pooling": "mean"})),
    # Why the ViT's representation is one vector shared by every image (each point a
    # hypothesis; docs/demo_calibration.md). LARS adaptation and weight decay on every
    # parameter: Appendix A's exclusions give the class token, the biases and the LayerNorm
    # parameters the raw LR (peak 1.0 here), and nothing in a pre-LN transformer's residual
    # stream normalises away what they add to every image.
    "vit_e80_adaptall": ("digits", _epochs(80.0, **_VIT, **{
        "optimizer.exclude_bias_and_norm": False})),
    # LARS adapting the class token (neither a bias nor a normalisation parameter; it ran at
    # commit 7780286, since reverted): same overrides as vit_e80, other code. Then with MoCo
    # v3's fix for its ViTs' training instability, the random patch projection frozen.
    "vit_e80_lars_cls": ("digits", _epochs(80.0, **_VIT)),
    "vit_e80_lars_cls_frozen": ("digits", _epochs(80.0, **_VIT, **_FROZEN)),
    # MoCo v3's optimizer and target (AdamW, tau 0.99, frozen projection) at a peak LR of 5e-4.
    "vit_e80_adamw_moco": ("digits", _epochs(80.0, **_VIT, **_FROZEN, **{
        **_ADAMW, "optimizer.base_learning_rate": 1e-3, "target.base_ema": 0.99})),
    # Every trained ViT above ends with >99.8% of its representation's energy in one vector
    # shared by every image, whatever the optimizer: the LayerNorm keeps it, a ResNet's
    # BatchNorms remove it. A BatchNorm as the final norm (model.encoder.final_norm).
    "vit_e80_bn": ("digits", _epochs(80.0, **_VIT, **_BN_FINAL)),
    "vit_e160_bn": ("digits", _epochs(160.0, **_VIT, **_BN_FINAL)),
    # Seed 1 of vit_e160_bn lost kNN accuracy in its first 300 steps (0.73 -> 0.61) while the
    # 2-epoch warm-up brought the LR to its peak; a tenth of training as warm-up (MoCo v3's
    # ViTs warm up for 40 of 300 epochs).
    "vit_e160_bn_warm16": ("digits", _epochs(160.0, **_VIT, **_BN_FINAL, **{
        "training.warmup_epochs": 16.0})),
    "vit_e80_adamw_moco_bn": ("digits", _epochs(80.0, **_VIT, **_FROZEN, **_BN_FINAL, **{
        **_ADAMW, "optimizer.base_learning_rate": 1e-3, "target.base_ema": 0.99})),
    # The second dataset: the digits at 12 px (3 x 3 patches of 4 px; the blur kept at 16 px's).
    "vit_e160_bn_r12": ("digits", _epochs(160.0, {**_R16_W2, "data.image_size": 12}, **_VIT,
                                          **_BN_FINAL)),
    "vit_e160_bn_warm16_r12": ("digits", _epochs(160.0, {**_R16_W2, "data.image_size": 12},
                                                 **_VIT, **_BN_FINAL, **{
                                                     "training.warmup_epochs": 16.0})),
}
# The point byol_flax/configs/digits_cpu.py's default recipe reproduces (tests/test_experiments.py).
CHOSEN = "r16_w2_e160_combo"
# The point digits_cpu.py's ViT recipe (augment=vit) reproduces.
VIT_CHOSEN = "vit_e160_bn_warm16"
# (point, seed) runs that shared the 2 cores with test runs: their times are inflated (marked *).
# Later runs measure it (benchmarks/quiet.py: "load" in the row).
SHARED_MACHINE = {("r16_w2_e80_scaledblur", 0), ("r16_w2_e160_combo", 2),
                  *((point, 0) for point in POINTS if point.startswith("vit_"))}
# Table column -> (evaluation of the run, metric): the demo report's methods.
COLUMNS = {name.removesuffix("_top1"): method for name, method in report.METHODS.items()}


class _Identity(nnx.Module):
    def __call__(self, x):
        return x


def shared_fraction(x: np.ndarray) -> float:
    """||mean_i x_i||^2 / mean_i ||x_i||^2: the share of the vectors' energy that is one vector
    common to every image (1: every image maps to the same vector; 0: centred)."""
    x = np.asarray(x, np.float64)
    return float(np.sum(x.mean(axis=0) ** 2) / np.mean(np.sum(x ** 2, axis=1)))


def vit_anatomy(run_dir: str, seed: int) -> dict[str, float]:
    """Where a ViT's shared component sits, on the test split's evaluation views: the shared
    fraction of the representation (the class token after the final norm) and of the class
    token's residual stream before it, for the trained encoder and its random-init twin, with
    the norms of the parameters that add the same vector to every image (class token, biases)
    beside the stream's typical norm."""
    out = {}
    for label, source in (("byol", run_dir), ("random_init", RANDOM_PREFIX + run_dir)):
        pretrained = load_source(source, seed=seed)
        data = pretrained.pretrain_config["data"]
        config = eval_digits.get_config(
            f"linear,data={data['dir']},image_size={data['image_size']}")
        features = {}
        for what in ("representation", "stream"):
            ctx = Context(config, pretrained, make_mesh(), SweepStore(None), f"{label}-{what}")
            features[what] = ctx.features(ctx.test)[0]
            out[f"{label}_{what}_shared_fraction"] = shared_fraction(features[what])
            pretrained.encoder.norm = _Identity()  # next: the class token's residual stream
        out[f"{label}_stream_norm"] = float(np.mean(np.linalg.norm(features["stream"], axis=1)))
        params = nnx.state(pretrained.encoder, nnx.Param)
        out[f"{label}_cls_token_norm"] = float(np.linalg.norm(params["cls_token"][...]))
        biases = [np.linalg.norm(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
            params) if "bias" in jax.tree_util.keystr(path)]
        out[f"{label}_biases_norm"] = float(np.sqrt(np.sum(np.square(biases))))
    return out


def run_point(workdir: epath.Path, name: str, seed: int) -> dict:
    done = workdir / name / f"seed_{seed}" / "calibration.json"
    if done.exists():
        return json.loads(done.read_text())
    recipe, overrides = POINTS[name]
    started = time.perf_counter()
    loads: list[quiet.Load] = []
    with quiet.watch(loads):  # what else used the CPUs meanwhile (times marked (*) if any)
        (run,) = runner.run(demo.demo_study([demo.recipe_row(name, recipe, overrides)],
                                            seeds=(seed,)), workdir)
    row = {"point": name, "seed": seed, "recipe": recipe, "overrides": overrides,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip(),
           "steps": run["steps"], "train_seconds": run["train_seconds"],
           "total_seconds": time.perf_counter() - started,
           **{c: run["evaluations"][key]["test"][metric] for c, (key, metric) in COLUMNS.items()},
           "final_metrics": run["final_metrics"], "load": quiet.verdict(loads)}
    if is_vit(run["config"]["model"]["encoder"]["name"]):
        row["anatomy"] = vit_anatomy(run["dir"], seed)
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=2, sort_keys=True))
    return row


def describe(overrides: dict) -> str:
    """Short form of a point's overrides: last key component, views' equal settings once."""
    parts = {}
    for key, value in overrides.items():
        name = key.split(".")[-1]
        parts[name] = f"{value:.3g}" if isinstance(value, float) else str(value)
    return ", ".join(f"{name}={value}" for name, value in parts.items())


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.3f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| point | recipe | overrides | code | seed | steps | train s | train+eval s | "
             + " | ".join(c.replace("_", " ") for c in COLUMNS)
             + " | proj. eff. rank | online classifier | repr. std ratio |",
             "|---" * (len(COLUMNS) + 11) + "|"]
    for r in rows:
        final = r["final_metrics"]
        overrides = describe(r["overrides"])
        shared = (r["point"], r["seed"]) in SHARED_MACHINE if "load" not in r else \
            not r["load"]["quiet"]
        mark = " (*)" if shared else ""
        rank = final.get("collapse/projection_effective_rank", float("nan"))
        online = final.get("online_classifier/top1", float("nan"))
        lines.append(f"| {r['point']} | {r['recipe']} | {overrides} | {r.get('commit', '-')} | "
                     f"{r['seed']} | {r['steps']} | "
                     f"{r['train_seconds']:.0f}{mark} | {r['total_seconds']:.0f}{mark} | "
                     + " | ".join(_cell(r, c) for c in COLUMNS)
                     + f" | {rank:.1f} | "
                     + ("-" if np.isnan(online) else f"{online:.3f}") + " | "
                     + _cell(final, "collapse/representation_std_ratio") + " |")
    by_point: dict[str, list[dict]] = {}
    for r in rows:
        by_point.setdefault(r["point"], []).append(r)
    lines += ["", "Mean +- std over the seeds run:", "",
              "| point | seeds | " + " | ".join(c.replace("_", " ") for c in COLUMNS)
              + " | online classifier | train s |", "|---" * (len(COLUMNS) + 4) + "|"]
    for point, rs in by_point.items():
        cells = []
        for c in COLUMNS:
            values = np.asarray([r[c] for r in rs if c in r])
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}" if len(values) else "-")
        online = np.asarray([r["final_metrics"].get("online_classifier/top1", np.nan) for r in rs])
        online_cell = "-" if np.isnan(online).all() else \
            f"{np.nanmean(online):.3f} +- {np.nanstd(online):.3f}"
        lines.append(f"| {point} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells)
                     + f" | {online_cell} | {np.mean([r['train_seconds'] for r in rs]):.0f} |")
    anatomies = [r for r in rows if "anatomy" in r]
    if anatomies:
        lines += ["", "Where the shared component sits (`vit_anatomy`, test split): the share "
                  "of the vectors' energy that is one vector common to every image, for the "
                  "representation and for the class token's residual stream before the final "
                  "LayerNorm, and the norms of the class token and of all biases beside the "
                  "stream's mean norm (trained encoder / random init):", "",
                  "| point | seed | repr. shared | stream shared | stream norm | class token "
                  "norm | biases norm |", "|---" * 7 + "|"]
        for r in anatomies:
            a = r["anatomy"]
            pair = lambda key, fmt: (f"{a[f'byol_{key}']:{fmt}} / "
                                     f"{a[f'random_init_{key}']:{fmt}}")
            lines.append(f"| {r['point']} | {r['seed']} | "
                         f"{pair('representation_shared_fraction', '.4f')} | "
                         f"{pair('stream_shared_fraction', '.4f')} | "
                         f"{pair('stream_norm', '.1f')} | {pair('cls_token_norm', '.3g')} | "
                         f"{pair('biases_norm', '.2f')} |")
    return "\n".join(lines) + "\n"


CURVES = (("knn/top1_k20", "kNN top-1 on holdout"),
          ("online_classifier/top1", "online classifier top-1 on holdout"),
          ("collapse/projection_effective_rank", "projection effective rank"),
          ("collapse/representation_std_ratio", "representation std x sqrt(d)"),
          ("loss", "BYOL loss"), ("grad_norm", "gradient norm"))


def seed_curves(workdir: epath.Path, point: str, plot: Path) -> str:
    """Monitors of every finished seed of ``point`` over training: a plot, and a table of where
    each seed's curves end and how low its effective rank went (the seed-stability check)."""
    runs = []
    for done in sorted((workdir / point).glob("seed_*/calibration.json")):
        row = json.loads(done.read_text())
        runs.append({**row, "row": point, "scalars": report.read_scalars(done.parent)})
    report._plot_scalars(epath.Path(plot), runs, CURVES, f"{point}: monitors per seed")
    lines = ["| seed | BYOL linear | BYOL kNN | " + " | ".join(
        f"{label} (end)" for _, label in CURVES) + " | lowest eff. rank (step) |",
        "|---" * (len(CURVES) + 4) + "|"]
    for run in runs:
        ends = [run["scalars"][tag][1][-1] if tag in run["scalars"] else float("nan")
                for tag, _ in CURVES]
        steps, ranks = run["scalars"]["collapse/projection_effective_rank"]
        lowest = int(np.argmin(ranks))
        lines.append(f"| {run['seed']} | {run['byol_linear']:.3f} | {run['byol_knn']:.3f} | "
                     + " | ".join(f"{v:.3f}" for v in ends)
                     + f" | {ranks[lowest]:.1f} ({steps[lowest]}) |")
    return "\n".join(lines) + "\n"


def finished_rows(workdir: epath.Path) -> list[dict]:
    """Every finished (point, seed) in the workdir, in POINTS order."""
    rows = [json.loads(p.read_text()) for p in workdir.glob("*/seed_*/calibration.json")]
    order = {name: index for index, name in enumerate(POINTS)}
    return sorted(rows, key=lambda r: (order.get(r["point"], len(order)), r["seed"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdirs/calibration")
    parser.add_argument("--points", default=",".join(POINTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--table", default="", help="also write the markdown table of every "
                        "finished point in the workdir here")
    parser.add_argument("--table-only", action="store_true", help="run nothing, write the table")
    parser.add_argument("--curves", default="", metavar="POINT", help="run nothing; plot the "
                        "monitors of POINT's seeds to --plot and print their table")
    parser.add_argument("--plot", default="seed_curves.png")
    args = parser.parse_args()
    workdir = epath.Path(args.workdir).absolute()
    if args.curves:
        print(seed_curves(workdir, args.curves, Path(args.plot)))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    for name in [] if args.table_only else args.points.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_point(workdir, name, seed)
            print(f"{name} seed {seed}: " + ", ".join(f"{c} {row[c]:.3f}" for c in COLUMNS)
                  + f"; train {row['train_seconds']:.0f} s", flush=True)
            (workdir / "calibration.md").write_text(markdown(finished_rows(workdir)))
    table = markdown(finished_rows(workdir))
    (workdir / "calibration.md").write_text(table)
    if args.table:
        Path(args.table).write_text(table)
    print(json.dumps({"device": jax.devices()[0].device_kind,
                      "rows": len(finished_rows(workdir))}))


if __name__ == "__main__":
    main()
