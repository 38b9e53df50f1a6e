"""Linear evaluation (Appendix D.1; Table 7's variant selectable): a linear classifier on the
frozen encoder (weights and BatchNorm statistics), its LR chosen on the selection split.

``linear.feature_norm``: ``none`` (the paper's) or ``batchnorm`` (every feature standardised
with the training split's statistics before the classifier, MAE's probe; for ViTs).
``linear.augment``: ``spatial`` (random resized crop + flip, the main paper's protocol),
``pretrain`` (Table 7: the pre-training augmentations T) or ``none`` (evaluation views, features
computed once and the classifier trained on them: fast on small data). Every LR of the grid is
trained in the same pass (:mod:`byol_flax.evaluation.heads`: one encoder forward per batch feeds
one head per LR), checkpointed as one unit; each head is then scored on the selection split's
features and the selected head on the test split's.
"""

from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

import byol_flax.evaluation.classifier as clf
from byol_flax.data.augment import normalize, photometric_augment
from byol_flax.data.pipeline import labelled_dataset
from byol_flax.evaluation import heads as heads_lib
from byol_flax.evaluation.base import Context, Scores, protocol, result, sweep, this_process
from byol_flax.evaluation.classifier import DeviceAugment

# MAE's linear probe: torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6) before the classifier.
FEATURE_NORM_EPS = 1e-6
Split = tuple[np.ndarray, np.ndarray]  # (features, labels)


def feature_standardizer(train_features: np.ndarray) -> heads_lib.Standardizer:
    """(mean, 1 / sqrt(variance + eps)) of each feature over the training split's frozen
    features (evaluation view): a BatchNorm without affine parameters in inference mode, its
    statistics from the data the classifier is fitted on, never the selection or test split."""
    features = np.asarray(train_features, np.float64)
    return (features.mean(axis=0).astype(np.float32),
            (1.0 / np.sqrt(features.var(axis=0) + FEATURE_NORM_EPS)).astype(np.float32))


def standardize(split: Split, standardizer: heads_lib.Standardizer | None) -> Split:
    """``split``'s features standardised (unchanged without a standardizer)."""
    if standardizer is None:
        return split
    return (np.asarray(split[0], np.float32) - standardizer[0]) * standardizer[1], split[1]


def linear_scores(split: Split) -> Callable[[dict[str, Any]], Scores]:
    """Accuracy of a linear classifier {"kernel", "bias"} on fixed (features, labels)."""
    return lambda params: clf.accuracy_metrics(clf.linear_logits(params, split[0]), split[1])


def _first(fit_all: Callable[[list[dict[str, Any]]], list[Any]]
           ) -> Callable[[dict[str, Any]], Any]:
    """One point fitted alone (a refit of a point scored by an earlier run)."""

    def fit(point):
        model = fit_all([point])[0]
        if isinstance(model, FloatingPointError):
            raise model
        return model

    return fit


def device_augment(config: ml_collections.ConfigDict) -> DeviceAugment | None:
    """The augmentation the linear protocol's step applies on device: Table 7's pre-training
    augmentation (view 1's, photometric) with ``linear.augment="pretrain"``, else none (the
    spatial crop and flip happen on the host)."""
    if config.linear.augment != "pretrain":
        return None
    aug = config.augment
    return lambda key, images: normalize(photometric_augment(images, key, aug.view1, aug))


@protocol("linear")
def run_linear(ctx: Context) -> dict[str, Any]:
    """Appendix D.1: SGD Nesterov on a frozen encoder, LR swept, chosen on selection."""
    cfg = ctx.config.linear
    tclip = (cfg.tclip_alpha, cfg.tclip_beta) if cfg.tclip else (0.0, 0.0)
    points = [{"learning_rate": lr} for lr in cfg.learning_rates]
    standardizer = None
    if cfg.feature_norm == "batchnorm":
        standardizer = feature_standardizer(ctx.features(ctx.train, limit=ctx.train_limit)[0])
    selection = lambda: standardize(ctx.features(ctx.selection, limit=ctx.eval_limit),
                                    standardizer)
    test = lambda: standardize(ctx.features(ctx.test, limit=ctx.eval_limit), standardizer)
    if cfg.augment == "none":
        train = standardize(ctx.features(ctx.train, limit=ctx.train_limit), standardizer)
        return linear_on_features(ctx, train, selection(), test(), points,
                                  {"tclip_alpha": tclip[0], "tclip_beta": tclip[1]})

    batch, per_epoch = clf.steps_per_epoch(ctx.num_train, cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)
    spec = clf.sgd_spec(cfg, total)
    augment = device_augment(ctx.config)

    def fit_all(todo):
        rates = [point["learning_rate"] for point in todo]
        batches = iter(labelled_dataset(ctx.config, ctx.train, indices=ctx.train_indices(),
                                        batch_size=batch, augment=True, seed=ctx.config.seed,
                                        **this_process()))
        with ctx.unit_checkpoints("linear", todo, total) as checkpoints:
            heads, losses = heads_lib.train_heads(
                ctx.pretrained.encoder, batches, num_classes=ctx.num_classes, spec=spec,
                learning_rates=rates, mesh=ctx.mesh, seed=ctx.config.seed,
                checkpoints=checkpoints, augment=augment, tclip=tclip, standardizer=standardizer)
        return heads_lib.unstack(heads, losses, rates)

    selected, head, rows = sweep(ctx, "linear", points, _first(fit_all),
                                 lambda h: linear_scores(selection())(h), metric="top1",
                                 fit_all=fit_all)
    head = head or _first(fit_all)(selected)
    scores = linear_scores(test())(head)
    ctx.discard_checkpoints("linear")
    return result(ctx, "linear", rows, selected, scores, augment=cfg.augment, tclip=cfg.tclip,
                  feature_norm=cfg.feature_norm, steps=total, batch_size=batch)


def linear_on_features(ctx: Context, train: Split, selection: Split, test: Split,
                       points: Sequence[dict[str, Any]],
                       tclip: dict[str, float]) -> dict[str, Any]:
    """The LR sweep of linear evaluation on fixed features: fit on train (every LR in one
    pass), select on selection, report test."""
    cfg = ctx.config.linear
    batch, per_epoch = clf.steps_per_epoch(len(train[0]), cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)
    spec = clf.sgd_spec(cfg, total)

    def fit_all(todo):
        rates = [point["learning_rate"] for point in todo]
        with ctx.unit_checkpoints("linear_features", todo, total) as checkpoints:
            heads, losses = heads_lib.fit_heads_on_features(
                *train, num_classes=ctx.num_classes, spec=spec, learning_rates=rates,
                batch_size=batch, seed=ctx.config.seed, checkpoints=checkpoints,
                chunk_steps=ctx.config.checkpoint_every_steps,
                tclip=(tclip["tclip_alpha"], tclip["tclip_beta"]))
        return heads_lib.unstack(heads, losses, rates)

    selected, params, rows = sweep(ctx, "linear_features", points, _first(fit_all),
                                   linear_scores(selection), metric="top1", fit_all=fit_all)
    params = params or _first(fit_all)(selected)
    scores = linear_scores(test)(params)
    ctx.discard_checkpoints("linear_features")
    return result(ctx, "linear", rows, selected, scores, augment="none",
                  tclip=bool(tclip["tclip_alpha"]), feature_norm=cfg.feature_norm, steps=total,
                  batch_size=batch)
