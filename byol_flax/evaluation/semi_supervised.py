"""Semi-supervised fine-tuning (Appendix D.1): the whole network fine-tuned on a balanced label
fraction of the train split or on a split file (SimCLR's 1% / 10% lists), LR x epochs swept."""

import logging
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

import byol_flax.evaluation.classifier as clf
from byol_flax.data.pipeline import OpenedSplit, labelled_dataset, labels_and_ids
from byol_flax.data.records import DataError
from byol_flax.evaluation.base import Context, protocol, result, sweep, this_process
from byol_flax.models.vit import unfreeze_patch_projection
from byol_flax.storage import files


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset: round(fraction * n / C) examples of every class
    (at least 1; all of a class that has fewer), chosen by a seeded permutation."""
    classes = np.unique(labels)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))


def subset_from_split_file(ids: list[str], split_file: str) -> np.ndarray:
    """Sorted indices of the records listed in ``split_file`` (one id or file name per line,
    e.g. SimCLR's ``1percent.txt``); a record matches by its id or the id's last path part."""
    try:
        text = files.read_text(split_file, what="semi-supervised split file")
    except files.StorageError as error:
        raise DataError(str(error)) from None
    wanted = [line.strip() for line in text.splitlines() if line.strip()]
    position = {}
    for index, record_id in enumerate(ids):
        position.setdefault(record_id, index)
        position.setdefault(record_id.rsplit("/", 1)[-1], index)
    missing = [w for w in wanted if w not in position]
    if missing:
        raise DataError(f"{split_file}: {len(missing)} of {len(wanted)} listed images are not in "
                        f"the train split, e.g. {missing[:3]}")
    return np.asarray(sorted({position[w] for w in wanted}))


def _set_batchnorm_decay(module: nnx.Module, decay: float) -> None:
    for _, child in nnx.iter_modules(module):
        if isinstance(child, nnx.BatchNorm):
            child.momentum = decay


def fine_tune(ctx: Context, opened: OpenedSplit, indices: np.ndarray | None, *,
              learning_rate: float, weight_decay: float, steps: int, batch_size: int,
              section: ml_collections.ConfigDict, batchnorm_decay: float,
              unit: tuple[str, dict[str, Any]]) -> clf.Classifier:
    """Whole network (encoder + zero-initialised head) trained with spatial augmentation (also
    the transfer fine-tuning of E.3), checkpointed as the training unit ``unit`` (sweep name,
    point) so that a stopped run resumes it."""
    model = clf.Classifier(nnx.clone(ctx.pretrained.encoder), ctx.num_classes,
                           seed=ctx.config.seed)
    if ctx.config.finetune_patch_projection and unfreeze_patch_projection(model.encoder):
        logging.info("fine-tuning the ViT's patch projection, frozen in pre-training")
    _set_batchnorm_decay(model, batchnorm_decay)
    batches = iter(labelled_dataset(ctx.config, opened, indices=indices, batch_size=batch_size,
                                    augment=True, seed=ctx.config.seed, **this_process()))
    with ctx.unit_checkpoints(unit[0], [unit[1]], steps) as checkpoints:
        return clf.train_classifier(model, batches, spec=clf.sgd_spec(section, steps),
                                    learning_rate=learning_rate, weight_decay=weight_decay,
                                    train_encoder=True, mesh=ctx.mesh, seed=ctx.config.seed,
                                    checkpoints=checkpoints)


@protocol("semi_supervised")
def run_semi_supervised(ctx: Context) -> dict[str, Any]:
    """Appendix D.1: fine-tune on a labelled subset, LR x epochs chosen on selection."""
    cfg = ctx.config.semi_supervised
    labels, ids = labels_and_ids(ctx.train, ctx.config.data)
    if cfg.split_file:
        subset = subset_from_split_file(ids, cfg.split_file)
    else:
        subset = balanced_subset(labels, cfg.label_fraction, cfg.subset_seed)
    batch, per_epoch = clf.steps_per_epoch(len(subset), cfg.batch_size)
    points = [{"learning_rate": lr, "epochs": e} for lr in cfg.learning_rates for e in cfg.epochs]

    def fit(point):
        return fine_tune(ctx, ctx.train, subset, learning_rate=point["learning_rate"],
                         weight_decay=cfg.weight_decay, steps=int(point["epochs"] * per_epoch),
                         batch_size=batch, section=cfg, batchnorm_decay=cfg.batchnorm_decay,
                         unit=("semi_supervised", point))

    selected, model, rows = sweep(ctx, "semi_supervised", points, fit,
                                  lambda m: ctx.classifier_scores(m, ctx.selection), metric="top1")
    model = model or fit(selected)
    test = ctx.classifier_scores(model, ctx.test)
    ctx.discard_checkpoints("semi_supervised")
    return result(ctx, "semi_supervised", rows, selected, test,
                  labelled_examples=len(subset), label_fraction=cfg.label_fraction,
                  split_file=cfg.split_file, batch_size=batch)
