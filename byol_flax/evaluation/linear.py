"""Linear evaluation (Appendix D.1; Table 7's variant selectable): a linear classifier on the
frozen encoder (weights and BatchNorm statistics), its LR chosen on the selection split.

``linear.augment``: ``spatial`` (random resized crop + flip, the main paper's protocol),
``pretrain`` (Table 7: the pre-training augmentations T) or ``none`` (evaluation views, features
computed once and the classifier trained on them: fast on small data).
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

import byol_flax.evaluation.classifier as clf
from byol_flax.data.augment import normalize, photometric_augment
from byol_flax.data.pipeline import labelled_dataset
from byol_flax.evaluation.base import Context, Scores, protocol, result, sweep, this_process


def linear_scores(split: tuple[np.ndarray, np.ndarray]) -> Callable[[dict[str, Any]], Scores]:
    """Accuracy of a linear classifier {"kernel", "bias"} on fixed (features, labels)."""
    return lambda params: clf.accuracy_metrics(clf.linear_logits(params, split[0]), split[1])


@protocol("linear")
def run_linear(ctx: Context) -> dict[str, Any]:
    """Appendix D.1: SGD Nesterov on a frozen encoder, LR swept, chosen on selection."""
    cfg = ctx.config.linear
    tclip = {"tclip_alpha": cfg.tclip_alpha if cfg.tclip else 0.0,
             "tclip_beta": cfg.tclip_beta if cfg.tclip else 0.0}
    points = [{"learning_rate": lr} for lr in cfg.learning_rates]
    if cfg.augment == "none":
        train = ctx.features(ctx.train, limit=ctx.train_limit)
        selection = ctx.features(ctx.selection, limit=ctx.eval_limit)
        test = ctx.features(ctx.test, limit=ctx.eval_limit)
        return linear_on_features(ctx, train, selection, test, points, tclip)

    batch, per_epoch = clf.steps_per_epoch(ctx.num_train, cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)
    spec = clf.sgd_spec(cfg, total)
    augment = None
    if cfg.augment == "pretrain":
        aug = ctx.config.augment
        augment = lambda key, images: normalize(photometric_augment(images, key, aug.view1, aug))

    def fit(point):
        model = clf.Classifier(nnx.clone(ctx.pretrained.encoder), ctx.num_classes,
                               seed=ctx.config.seed)
        batches = iter(labelled_dataset(ctx.config, ctx.train, indices=ctx.train_indices(),
                                        batch_size=batch, augment=True, seed=ctx.config.seed,
                                        **this_process()))
        return clf.train_classifier(model, batches, spec=spec, learning_rate=point["learning_rate"],
                                    train_encoder=False, mesh=ctx.mesh, seed=ctx.config.seed,
                                    augment=augment, **tclip)

    selected, model, rows = sweep(ctx, "linear", points, fit,
                                  lambda m: ctx.classifier_scores(m, ctx.selection), metric="top1")
    model = model or fit(selected)
    return result(ctx, "linear", rows, selected, ctx.classifier_scores(model, ctx.test),
                  augment=cfg.augment, tclip=cfg.tclip, steps=total, batch_size=batch)


def linear_on_features(ctx: Context, train: tuple[np.ndarray, np.ndarray],
                       selection: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], points: Sequence[dict[str, Any]],
                       tclip: dict[str, float]) -> dict[str, Any]:
    """The LR sweep of linear evaluation on fixed features: fit on train, select on selection,
    report test."""
    cfg = ctx.config.linear
    batch, per_epoch = clf.steps_per_epoch(len(train[0]), cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)
    spec = clf.sgd_spec(cfg, total)

    def fit(point):
        return clf.fit_linear_on_features(*train, num_classes=ctx.num_classes, spec=spec,
                                          learning_rate=point["learning_rate"],
                                          batch_size=batch, seed=ctx.config.seed, **tclip)

    selected, params, rows = sweep(ctx, "linear_features", points, fit,
                                   linear_scores(selection), metric="top1")
    params = params or fit(selected)
    return result(ctx, "linear", rows, selected, linear_scores(test)(params), augment="none",
                  tclip=bool(tclip["tclip_alpha"]), steps=total, batch_size=batch)
