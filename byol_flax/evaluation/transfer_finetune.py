"""Transfer by fine-tuning (Appendix E.3): SGD Nesterov 0.9, 20000 steps at batch 256, 7 LRs x
(7 weight decays + none) with the decay divided by the LR, BatchNorm decay max(1 - 10/s, 0.9),
refit on train + selection."""

import math
from typing import Any

import ml_collections
import numpy as np

import byol_flax.evaluation.classifier as clf
from byol_flax.data.pipeline import combine_splits
from byol_flax.evaluation.base import Context, protocol, result, sweep
from byol_flax.evaluation.semi_supervised import fine_tune


def finetune_grid(cfg: ml_collections.ConfigDict) -> list[dict[str, float]]:
    """E.3: LRs x weight decays (log-spaced, plus none); the decay applied is wd / lr."""
    rates = np.logspace(math.log10(cfg.learning_rate_min), math.log10(cfg.learning_rate_max),
                        cfg.learning_rate_count)
    decays = list(np.logspace(math.log10(cfg.weight_decay_min),
                              math.log10(cfg.weight_decay_max), cfg.weight_decay_count))
    decays += [0.0] if cfg.include_no_weight_decay else []
    return [{"learning_rate": float(lr), "weight_decay": float(wd)}
            for lr in rates for wd in decays]


def finetune_batchnorm_decay(steps_per_epoch: int) -> float:
    """E.3: BatchNorm momentum max(1 - 10 / s, 0.9), s = steps per epoch."""
    return max(1.0 - 10.0 / steps_per_epoch, 0.9)


@protocol("transfer_finetune")
def run_transfer_finetune(ctx: Context) -> dict[str, Any]:
    """Appendix E.3: fine-tune over the LR x weight-decay grid, refit on train + selection."""
    cfg = ctx.config.transfer_finetune
    indices = ctx.train_indices()
    batch, per_epoch = clf.steps_per_epoch(ctx.num_train, cfg.batch_size)

    def fit(point, opened=ctx.train, subset=indices, epoch_steps=per_epoch):
        return fine_tune(ctx, opened, subset, learning_rate=point["learning_rate"],
                         weight_decay=point["weight_decay"] / point["learning_rate"],
                         steps=cfg.steps, batch_size=batch, section=cfg,
                         batchnorm_decay=finetune_batchnorm_decay(epoch_steps),
                         unit=("transfer_finetune", {**point, "split": opened.split}))

    selected, model, rows = sweep(ctx, "transfer_finetune", finetune_grid(cfg), fit,
                                  lambda m: ctx.classifier_scores(m, ctx.selection),
                                  metric=cfg.metric)
    if cfg.refit_on_train_and_selection:
        combined = combine_splits(ctx.train, ctx.selection)
        subset = (None if indices is None else
                  np.concatenate([indices, ctx.train.num_records
                                  + np.arange(ctx.selection.num_records)]))
        count = len(subset) if subset is not None else combined.num_records
        model = fit(selected, combined, subset, clf.steps_per_epoch(count, batch)[1])
    else:
        model = model or fit(selected)
    test = ctx.classifier_scores(model, ctx.test)
    ctx.discard_checkpoints("transfer_finetune")
    return result(ctx, "transfer_finetune", rows, selected, test, metric=cfg.metric,
                  refit_on_train_and_selection=cfg.refit_on_train_and_selection,
                  steps=cfg.steps, batch_size=batch)
