"""The paper's evaluation protocols, each a function of (config, encoder, mesh, sweep store).

Every protocol fits on ``data.train_split``, chooses its hyper-parameters on
``data.selection_split`` only, and reports the chosen setting on ``data.test_split``:

* ``linear`` (Appendix D.1, Table 7 variant selectable): frozen encoder, LR sweep.
* ``semi_supervised`` (D.1): fine-tune on a balanced label fraction or a split file, LR x epochs.
* ``transfer_linear`` (E.2): L-BFGS logistic regression over 45 l2 values, refit on
  train + selection.
* ``transfer_finetune`` (E.3): fine-tune over 7 LRs x 8 weight decays, refit on train + selection.
* ``knn``: weighted kNN on frozen features (the online monitor's code).

A sweep point's selection score is saved as soon as it is known (``SweepStore``), so a re-run
after a preemption skips finished points; the chosen point is refitted if its model was not
trained in this process (all fits are seeded, so the refit is the same model).
"""

import dataclasses
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from byol_flax.data.augment import EVAL_RESIZE_RATIO, normalize, photometric_augment
from byol_flax.data.pipeline import (OpenedSplit, combine_splits, labelled_dataset,
                                     labels_and_ids, open_split)
from byol_flax.data.records import DataError
from byol_flax.evaluation import classifier as clf
from byol_flax.export.encoder import PretrainedEncoder
from byol_flax.evaluation.features import extract_features
from byol_flax.evaluation.knn import knn_accuracy
from byol_flax.evaluation.transfer import fit_logistic_regression, l2_grid

Scores = dict[str, float]
# Features already extracted in this process, by (encoder identity, split, view).
_FEATURES: dict[str, tuple[np.ndarray, np.ndarray]] = {}


class SweepStore:
    """One JSON file per finished sweep point under ``directory`` (the evaluation workdir)."""

    def __init__(self, directory: epath.PathLike | None):
        self._directory = epath.Path(directory) if directory else None
        if self._directory:
            self._directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, point: dict[str, Any]) -> epath.Path | None:
        if not self._directory:
            return None
        digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]
        return self._directory / f"{name}-{digest}.json"

    def get(self, name: str, point: dict[str, Any]) -> Scores | None:
        path = self._path(name, point)
        if path and path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise DataError(f"sweep point file {path} is damaged ({error}); delete it to "
                                "refit that point") from error
            if saved["point"] == point:
                return saved["selection"]
        return None

    def put(self, name: str, point: dict[str, Any], selection: Scores) -> None:
        """Written by process 0 only, atomically (temporary file + rename)."""
        path = self._path(name, point)
        if path and jax.process_index() == 0:
            temporary = path.parent / (path.name + ".tmp")
            temporary.write_text(json.dumps({"point": point, "selection": selection},
                                            sort_keys=True))
            temporary.rename(path)


def labelled_split(config: ml_collections.ConfigDict, key: str) -> OpenedSplit:
    """The split ``config.data.<key>`` names, refused in one line naming it when its data has no
    labels: every protocol fits or scores a classifier."""
    split = config.data[key]
    opened = open_split(config.data, split)
    if opened.manifest.num_classes == 0:
        raise DataError(f"config.data.{key}={split!r} of {config.data.dir} has no labels (its "
                        "manifest lists no label names): evaluation protocols need a labelled "
                        "dataset; point config.data.dir at one, e.g. a byol_flax.data.convert.image_folder "
                        "--layout folders conversion")
    return opened


@dataclasses.dataclass
class Context:
    """What every protocol needs: config, encoder, mesh, opened splits, store."""

    config: ml_collections.ConfigDict
    pretrained: PretrainedEncoder
    mesh: Mesh
    store: SweepStore
    identity: str  # distinguishes sweeps of different encoders sharing a store

    # Splits are opened (and their checksums verified) on first use.
    @functools.cached_property
    def train(self) -> OpenedSplit:
        return labelled_split(self.config, "train_split")

    @functools.cached_property
    def selection(self) -> OpenedSplit:
        return labelled_split(self.config, "selection_split")

    @functools.cached_property
    def test(self) -> OpenedSplit:
        return labelled_split(self.config, "test_split")

    @functools.cached_property
    def num_classes(self) -> int:
        return self.train.manifest.num_classes

    @property
    def train_limit(self) -> int:
        return self.config.data.max_train_examples

    def features(self, opened: OpenedSplit, *, limit: int = 0,
                 resize_ratio: float = EVAL_RESIZE_RATIO) -> tuple[np.ndarray, np.ndarray]:
        """Frozen features of ``opened``; computed once per process for a given encoder, split
        and view (the linear and kNN protocols of one encoder share them)."""
        key = json.dumps([self.identity, opened.data_dir, opened.split, limit, resize_ratio,
                          self.config.data.image_size])
        if key not in _FEATURES:
            apply, state = clf.make_inference_fn(self.pretrained.encoder, self.mesh)
            _FEATURES[key] = extract_features(
                apply, state, opened, self.config, self.mesh,
                batch_size=self.config.feature_batch_size, limit=limit, resize_ratio=resize_ratio)
        return _FEATURES[key]

    def classifier_scores(self, model: clf.Classifier, opened: OpenedSplit) -> Scores:
        apply, state = clf.make_inference_fn(model, self.mesh)
        logits, labels = extract_features(apply, state, opened, self.config, self.mesh,
                                          batch_size=self.config.feature_batch_size)
        return clf.accuracy_metrics(logits, labels)

    @property
    def num_train(self) -> int:
        """Training examples the protocol fits on (``data.max_train_examples`` caps them)."""
        return min(self.train_limit or self.train.num_records, self.train.num_records)

    def train_indices(self) -> np.ndarray | None:
        return np.arange(min(self.train_limit, self.train.num_records)) if self.train_limit \
            else None


def sweep(ctx: Context, name: str, points: Sequence[dict[str, Any]],
          fit: Callable[[dict[str, Any]], Any], score: Callable[[Any], Scores], *, metric: str
          ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Fits every point, scores it on the selection split, returns (best point, its model or
    None if it was scored by an earlier run, all rows). Ties go to the earlier point."""
    rows, best = [], None
    # Everything that changes a point's score: the encoder and the whole evaluation config.
    settings = ctx.config.to_dict()
    settings.pop("name")
    settings = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for point in points:
        key = {"encoder": ctx.identity, "config": settings.hexdigest(), **point}
        selection = ctx.store.get(name, key)
        model = None
        if selection is None:
            try:
                model = fit(point)
                selection = score(model)
            except FloatingPointError as error:  # a diverging point loses; the sweep goes on
                logging.warning("%s %s diverged: %s", name, point, error)
                selection = {metric: float("-inf"), "diverged": 1.0}
            ctx.store.put(name, key, selection)
        logging.info("%s %s: selection %s", name, point, selection)
        rows.append({"point": point, "selection": selection})
        if best is None or selection[metric] > best[1][metric]:
            best = (point, selection, model)
    point, _, model = best
    return point, model, rows


def result(ctx: Context, protocol: str, rows: list[dict[str, Any]], selected: dict[str, Any],
           test: Scores, **extra: Any) -> dict[str, Any]:
    data = ctx.config.data
    return {"protocol": protocol, "name": ctx.config.name or protocol,
            "source": ctx.pretrained.origin, "data_dir": data.dir, "train_split": data.train_split,
            "selection_split": data.selection_split, "test_split": data.test_split,
            "sweep": rows, "selected": selected, "test": test, **extra}


def _this_process() -> dict[str, int]:
    """Each process reads its rows of every global batch (as in pre-training)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def sgd_spec(section: ml_collections.ConfigDict, total_steps: int) -> clf.SgdSpec:
    return clf.SgdSpec(total_steps=total_steps, momentum=section.momentum,
                       nesterov=section.nesterov, schedule=section.schedule)


# ----------------------------------------------------------------------------------------------
# Linear evaluation (Appendix D.1).


def run_linear(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config.linear
    tclip = {"tclip_alpha": cfg.tclip_alpha if cfg.tclip else 0.0,
             "tclip_beta": cfg.tclip_beta if cfg.tclip else 0.0}
    points = [{"learning_rate": lr} for lr in cfg.learning_rates]
    if cfg.augment == "none":
        train = ctx.features(ctx.train, limit=ctx.train_limit)
        selection, test = ctx.features(ctx.selection), ctx.features(ctx.test)
        return linear_on_features(ctx, train, selection, test, points, tclip)

    batch, per_epoch = clf.steps_per_epoch(ctx.num_train, cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)
    spec = sgd_spec(cfg, total)
    augment = None
    if cfg.augment == "pretrain":
        aug = ctx.config.augment
        augment = lambda key, images: normalize(photometric_augment(images, key, aug.view1, aug))

    def fit(point):
        model = clf.Classifier(nnx.clone(ctx.pretrained.encoder), ctx.num_classes,
                               seed=ctx.config.seed)
        batches = iter(labelled_dataset(ctx.config, ctx.train, indices=ctx.train_indices(),
                                        batch_size=batch, augment=True, seed=ctx.config.seed,
                                        **_this_process()))
        return clf.train_classifier(model, batches, spec=spec, learning_rate=point["learning_rate"],
                                    train_encoder=False, mesh=ctx.mesh, seed=ctx.config.seed,
                                    augment=augment, **tclip)

    selected, model, rows = sweep(ctx, "linear", points, fit,
                                  lambda m: ctx.classifier_scores(m, ctx.selection), metric="top1")
    model = model or fit(selected)
    return result(ctx, "linear", rows, selected, ctx.classifier_scores(model, ctx.test),
                  augment=cfg.augment, tclip=cfg.tclip, steps=total, batch_size=batch)


def _linear_scores(split: tuple[np.ndarray, np.ndarray]
                   ) -> Callable[[dict[str, Any]], Scores]:
    """Accuracy of a linear classifier {"kernel", "bias"} on fixed (features, labels)."""
    return lambda params: clf.accuracy_metrics(clf.linear_logits(params, split[0]), split[1])


def linear_on_features(ctx: Context, train: tuple[np.ndarray, np.ndarray],
                       selection: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], points: Sequence[dict[str, Any]],
                       tclip: dict[str, float]) -> dict[str, Any]:
    """The LR sweep of linear evaluation on fixed features: fit on train, select on selection,
    report test."""
    cfg = ctx.config.linear
    batch, per_epoch = clf.steps_per_epoch(len(train[0]), cfg.batch_size)
    total = max(int(cfg.epochs * per_epoch), 1)

    spec = sgd_spec(cfg, total)

    def fit(point):
        return clf.fit_linear_on_features(*train, num_classes=ctx.num_classes, spec=spec,
                                          learning_rate=point["learning_rate"],
                                          batch_size=batch, seed=ctx.config.seed, **tclip)

    selected, params, rows = sweep(ctx, "linear_features", points, fit,
                                   _linear_scores(selection), metric="top1")
    params = params or fit(selected)
    return result(ctx, "linear", rows, selected, _linear_scores(test)(params), augment="none",
                  tclip=bool(tclip["tclip_alpha"]), steps=total, batch_size=batch)


# ----------------------------------------------------------------------------------------------
# Semi-supervised fine-tuning (Appendix D.1).


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
    wanted = [line.strip() for line in epath.Path(split_file).read_text().splitlines()
              if line.strip()]
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
              section: ml_collections.ConfigDict, batchnorm_decay: float) -> clf.Classifier:
    """Whole network (encoder + zero-initialised head) trained with spatial augmentation."""
    model = clf.Classifier(nnx.clone(ctx.pretrained.encoder), ctx.num_classes,
                           seed=ctx.config.seed)
    _set_batchnorm_decay(model, batchnorm_decay)
    batches = iter(labelled_dataset(ctx.config, opened, indices=indices, batch_size=batch_size,
                                    augment=True, seed=ctx.config.seed, **_this_process()))
    return clf.train_classifier(model, batches, spec=sgd_spec(section, steps),
                                learning_rate=learning_rate, weight_decay=weight_decay,
                                train_encoder=True, mesh=ctx.mesh, seed=ctx.config.seed)


def run_semi_supervised(ctx: Context) -> dict[str, Any]:
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
                         batch_size=batch, section=cfg, batchnorm_decay=cfg.batchnorm_decay)

    selected, model, rows = sweep(ctx, "semi_supervised", points, fit,
                                  lambda m: ctx.classifier_scores(m, ctx.selection), metric="top1")
    model = model or fit(selected)
    return result(ctx, "semi_supervised", rows, selected, ctx.classifier_scores(model, ctx.test),
                  labelled_examples=len(subset), label_fraction=cfg.label_fraction,
                  split_file=cfg.split_file, batch_size=batch)


# ----------------------------------------------------------------------------------------------
# Transfer (Appendix E.2, E.3).


def run_transfer_linear(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config.transfer_linear
    train = ctx.features(ctx.train, limit=ctx.train_limit, resize_ratio=cfg.resize_ratio)
    selection = ctx.features(ctx.selection, resize_ratio=cfg.resize_ratio)
    test = ctx.features(ctx.test, resize_ratio=cfg.resize_ratio)
    return transfer_linear_on_features(ctx, train, selection, test)


def transfer_linear_on_features(ctx: Context, train: tuple[np.ndarray, np.ndarray],
                                selection: tuple[np.ndarray, np.ndarray],
                                test: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """E.2 on fixed features: l2 chosen on selection (strongest first, warm-started), refit on
    train + selection, metric on test."""
    cfg = ctx.config.transfer_linear
    fit_kwargs = dict(num_classes=ctx.num_classes, max_iterations=cfg.max_iterations,
                      tolerance=cfg.tolerance)
    grid = sorted(l2_grid(cfg.l2_min, cfg.l2_max, cfg.l2_count), reverse=True)
    warm = {"params": None}

    def fit(point):
        params, _ = fit_logistic_regression(*train, l2=point["l2"], init=warm["params"],
                                            **fit_kwargs)
        warm["params"] = params
        return params

    selected, params, rows = sweep(ctx, "transfer_linear", [{"l2": float(v)} for v in grid],
                                   fit, _linear_scores(selection), metric=cfg.metric)
    if cfg.refit_on_train_and_selection:
        combined = (np.concatenate([train[0], selection[0]]),
                    np.concatenate([train[1], selection[1]]))
        params, _ = fit_logistic_regression(*combined, l2=selected["l2"], **fit_kwargs)
    else:
        params = params or fit_logistic_regression(*train, l2=selected["l2"], **fit_kwargs)[0]
    return result(ctx, "transfer_linear", rows, selected, _linear_scores(test)(params),
                  metric=cfg.metric,
                  refit_on_train_and_selection=cfg.refit_on_train_and_selection)


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


def run_transfer_finetune(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config.transfer_finetune
    indices = ctx.train_indices()
    batch, per_epoch = clf.steps_per_epoch(ctx.num_train, cfg.batch_size)

    def fit(point, opened=ctx.train, subset=indices, epoch_steps=per_epoch):
        return fine_tune(ctx, opened, subset, learning_rate=point["learning_rate"],
                         weight_decay=point["weight_decay"] / point["learning_rate"],
                         steps=cfg.steps, batch_size=batch, section=cfg,
                         batchnorm_decay=finetune_batchnorm_decay(epoch_steps))

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
    return result(ctx, "transfer_finetune", rows, selected, test, metric=cfg.metric,
                  refit_on_train_and_selection=cfg.refit_on_train_and_selection,
                  steps=cfg.steps, batch_size=batch)


# ----------------------------------------------------------------------------------------------
# kNN.


def run_knn(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config.knn
    train = ctx.features(ctx.train, limit=ctx.train_limit)
    kwargs = dict(ks=cfg.k, temperature=cfg.temperature, num_classes=ctx.num_classes)
    on = lambda opened: {f"top1_k{k}": v
                         for k, v in knn_accuracy(train, ctx.features(opened), **kwargs).items()}
    return result(ctx, "knn", [], {"k": list(cfg.k), "temperature": cfg.temperature},
                  on(ctx.test), selection=on(ctx.selection))


PROTOCOL_RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "linear": run_linear,
    "semi_supervised": run_semi_supervised,
    "transfer_linear": run_transfer_linear,
    "transfer_finetune": run_transfer_finetune,
    "knn": run_knn,
}


def run_protocol(config: ml_collections.ConfigDict, pretrained: PretrainedEncoder, mesh: Mesh,
                 store: SweepStore) -> dict[str, Any]:
    """Runs ``config.protocol`` and returns its result dict (JSON-able)."""
    identity = json.dumps(pretrained.origin, sort_keys=True)
    ctx = Context(config, pretrained, mesh, store, identity)
    return PROTOCOL_RUNNERS[config.protocol](ctx)


__all__ = ["PROTOCOL_RUNNERS", "SweepStore", "balanced_subset", "finetune_batchnorm_decay",
           "finetune_grid", "run_protocol", "subset_from_split_file"]
