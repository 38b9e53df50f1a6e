"""The evaluator interface, shared by the evaluation CLI and the training monitor.

Vocabulary: a *protocol* is a function ``run_<name>(ctx: Context) -> dict`` that evaluates an
encoder (kNN, linear, ...), registered with :func:`protocol`; an *evaluator* is the object a
config builds to run one (:class:`ProtocolEvaluator`, in :data:`EVALUATORS`), and
``run(subject)`` measures a :class:`PretrainedEncoder`, returning the result dict of
:func:`result` (``test`` holds the reported metrics). The CLI builds ``config.protocol``'s
evaluator (:func:`byol_flax.evaluation.evaluators.build_evaluator`); the training *monitor*
(:mod:`byol_flax.evaluation.monitor`) runs those ``config.monitor.evaluators`` names on the live
state. Importing :mod:`byol_flax.evaluation.evaluators` registers every shipped protocol.
"""

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

import byol_flax.evaluation.classifier as clf
from byol_flax.checkpointing.preemption import TerminationGuard
from byol_flax.data.augment import EVAL_RESIZE_RATIO
from byol_flax.data.pipeline import OpenedSplit, open_split
from byol_flax.data.records import DataError
from byol_flax.evaluation.features import FeatureStore, extract_features
from byol_flax.evaluation.resumable import UnitCheckpoints, measured_settings, settings_digest
from byol_flax.runtime.registry import Registry
from byol_flax.storage import files, json_files, schemas
from byol_flax.weights.encoder import PretrainedEncoder

Scores = dict[str, float]


class Evaluator(Protocol):
    # ``needs_labels``: the training loop switches the evaluator off before compiling when the
    # data it reads has no labels (byol_flax.train.plan_label_users). ``reads_monitor_data``:
    # as a training monitor it reads ``config.monitor.data_dir`` when that is set (a labelled
    # dataset beside unlabeled training data), the training data otherwise.
    needs_labels: ClassVar[bool]
    reads_monitor_data: ClassVar[bool]

    def run(self, subject: PretrainedEncoder) -> dict[str, Any]: ...


EvaluatorFactory = Callable[..., Evaluator]  # (config, mesh, *, store=None) -> Evaluator
# Filled as protocol modules are imported: byol_flax.evaluation.evaluators imports them all.
EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator")
SPLIT_KEYS = ("train_split", "selection_split", "test_split")  # of config.data


SWEEP_POINT_MAX_BYTES = 1 << 20


class SweepStore:
    """One JSON file per finished sweep point under ``directory`` (the evaluation workdir), and
    where the training units of unfinished points checkpoint: ``checkpoints`` (None: nowhere)
    with the CLI's SIGTERM flag ``termination``."""

    def __init__(self, directory: epath.PathLike | None, *,
                 checkpoints: epath.PathLike | None = None,
                 termination: TerminationGuard | None = None,
                 features: FeatureStore | None = None):
        self._directory = epath.Path(directory) if directory else None
        self.features = features  # the CLI's: frozen features kept for re-runs (on disk)
        if self._directory:
            self._directory.mkdir(parents=True, exist_ok=True)
        self.checkpoints = epath.Path(checkpoints) if checkpoints else None
        self.termination = termination

    def _path(self, name: str, point: dict[str, Any]) -> epath.Path | None:
        if not self._directory:
            return None
        digest = hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]
        return self._directory / f"{name}-{digest}.json"

    def get(self, name: str, point: dict[str, Any]) -> Scores | None:
        path = self._path(name, point)
        if path and files.exists(path):
            try:
                saved = json_files.read(path, spec=schemas.SWEEP_POINT, what="sweep point file",
                                        max_bytes=SWEEP_POINT_MAX_BYTES)
            except files.StorageError as error:
                raise DataError(f"{error}; delete it to refit that point") from None
            if saved["point"] == point:
                return saved["selection"]
        return None

    def put(self, name: str, point: dict[str, Any], selection: Scores) -> None:
        """Written by process 0 only, atomically (temporary file + rename)."""
        path = self._path(name, point)
        if path and jax.process_index() == 0:
            json_files.write(path, {"point": point, "selection": selection}, sort_keys=True,
                             what="sweep point file")


def labelled_split(config: ml_collections.ConfigDict, key: str) -> OpenedSplit:
    """The split ``config.data.<key>`` names, refused in one line naming it when its data has no
    labels: every protocol fits or scores a classifier."""
    split = config.data[key]
    opened = open_split(config.data, split)
    if opened.manifest.num_classes == 0:
        raise DataError(f"config.data.{key}={split!r} of {config.data.dir} has no labels (its "
                        "manifest lists no label names): evaluation protocols need a labelled "
                        "dataset; point config.data.dir at one, e.g. a "
                        "byol_flax.data.convert.image_folder --layout folders conversion")
    return opened


@dataclasses.dataclass
class Context:
    """What every protocol needs: config, encoder, mesh, opened splits, store."""

    config: ml_collections.ConfigDict
    pretrained: PretrainedEncoder
    mesh: Mesh
    store: SweepStore
    identity: str  # distinguishes sweeps of different encoders sharing a store
    # Splits opened ahead, by config key ("train_split", ...): a monitor opens them once at
    # start-up (ProtocolEvaluator.open_splits) instead of at every run.
    opened_splits: dict[str, OpenedSplit] = dataclasses.field(default_factory=dict, repr=False)
    # Frozen features of this subject, extracted once per split and view: the store's (the
    # command's, kept on disk) or this context's own, in memory.
    _features: FeatureStore = dataclasses.field(default_factory=FeatureStore, repr=False)

    def _split(self, key: str) -> OpenedSplit:
        if key in self.opened_splits:
            return self.opened_splits[key]
        return labelled_split(self.config, key)

    # Splits not opened ahead are opened (and their checksums verified) on first use.
    @functools.cached_property
    def train(self) -> OpenedSplit:
        return self._split("train_split")

    @functools.cached_property
    def selection(self) -> OpenedSplit:
        return self._split("selection_split")

    @functools.cached_property
    def test(self) -> OpenedSplit:
        return self._split("test_split")

    @functools.cached_property
    def num_classes(self) -> int:
        return self.train.manifest.num_classes

    @property
    def train_limit(self) -> int:
        return self.config.data.max_train_examples

    @property
    def eval_limit(self) -> int:
        """Examples of the selection and test splits scored (0: all)."""
        return self.config.data.max_eval_examples

    def features(self, opened: OpenedSplit, *, limit: int = 0,
                 resize_ratio: float = EVAL_RESIZE_RATIO) -> tuple[np.ndarray, np.ndarray]:
        """Frozen features of ``opened``, computed once per split and view for this subject (a
        protocol scoring selection and test on one split computes them once)."""
        return (self.store.features or self._features).features(
            self.pretrained.encoder, opened, self.config, self.mesh, identity=self.identity,
            limit=limit, resize_ratio=resize_ratio, architecture=self.pretrained.model_config)

    def classifier_scores(self, model: nnx.Module, opened: OpenedSplit) -> Scores:
        """Accuracies of a network mapping images to logits on (the first ``eval_limit`` of)
        ``opened``."""
        apply, state = clf.make_inference_fn(model, self.mesh)
        logits, labels = extract_features(apply, state, opened, self.config, self.mesh,
                                          batch_size=self.config.feature_batch_size,
                                          limit=self.eval_limit)
        return clf.accuracy_metrics(logits, labels)

    @property
    def num_train(self) -> int:
        """Training examples the protocol fits on (``data.max_train_examples`` caps them)."""
        return min(self.train_limit or self.train.num_records, self.train.num_records)

    def train_indices(self) -> np.ndarray | None:
        return np.arange(min(self.train_limit, self.train.num_records)) if self.train_limit \
            else None

    def unit_checkpoints(self, name: str, points: Sequence[dict[str, Any]], total_steps: int
                         ) -> UnitCheckpoints:
        """The checkpoints of the training unit fitting ``points`` (one unit of sweep ``name``
        at a time: another point's finished unit there is replaced)."""
        directory = self.store.checkpoints / name if self.store.checkpoints else None
        record = {"unit": name, "encoder": self.identity, "points": list(points),
                  "config": measured_settings(self.config), "total_steps": total_steps}
        return UnitCheckpoints(directory, record, every_steps=self.config.checkpoint_every_steps,
                               total_steps=total_steps, termination=self.store.termination)

    def discard_checkpoints(self, name: str) -> None:
        """Removes sweep ``name``'s training checkpoints once its result is computed."""
        if self.store.checkpoints and jax.process_index() == 0:
            if (self.store.checkpoints / name).exists():
                (self.store.checkpoints / name).rmtree()


# A protocol: evaluates the context's encoder, returns :func:`result`'s dict.
ProtocolFn = Callable[[Context], dict[str, Any]]


def sweep(ctx: Context, name: str, points: Sequence[dict[str, Any]],
          fit: Callable[[dict[str, Any]], Any], score: Callable[[Any], Scores], *, metric: str,
          fit_all: Callable[[list[dict[str, Any]]], list[Any]] | None = None
          ) -> tuple[dict[str, Any], Any, list[dict[str, Any]]]:
    """Fits every point, scores it on the selection split, returns (best point, its model or
    None if it was scored by an earlier run, all rows). Ties go to the earlier point.

    ``fit_all`` fits every point not stored yet in one go (linear evaluation's heads share one
    pass), returning a model or a ``FloatingPointError`` per point; else ``fit`` fits each."""
    rows, best = [], None
    # Everything that changes a point's score: the encoder and the evaluation config.
    digest = settings_digest(ctx.config)
    keys = [{"encoder": ctx.identity, "config": digest, **point} for point in points]
    fitted: dict[int, Any] = {}
    if fit_all is not None:
        missing = [i for i, key in enumerate(keys) if ctx.store.get(name, key) is None]
        if missing:
            fitted = dict(zip(missing, fit_all([points[i] for i in missing]), strict=True))
    for index, (point, key) in enumerate(zip(points, keys, strict=True)):
        selection = ctx.store.get(name, key)
        model = None
        if selection is None:
            try:
                model = fitted.pop(index) if index in fitted else fit(point)
                if isinstance(model, FloatingPointError):
                    raise model
                selection = score(model)
            except FloatingPointError as error:  # a diverging point loses; the sweep goes on
                logging.warning("%s %s diverged: %s", name, point, error)
                model, selection = None, {metric: float("-inf"), "diverged": 1.0}
            ctx.store.put(name, key, selection)
        logging.info("%s %s: selection %s", name, point, selection)
        rows.append({"point": point, "selection": selection})
        if best is None or selection[metric] > best[1][metric]:
            best = (point, selection, model)
    point, _, model = best
    return point, model, rows


def result(ctx: Context, protocol: str, rows: list[dict[str, Any]], selected: dict[str, Any],
           test: Scores, **extra: Any) -> dict[str, Any]:
    """The shape every evaluator returns (and results.json holds)."""
    data = ctx.config.data
    return {"protocol": protocol, "name": ctx.config.name or protocol,
            "source": ctx.pretrained.origin, "data_dir": data.dir, "train_split": data.train_split,
            "selection_split": data.selection_split, "test_split": data.test_split,
            "sweep": rows, "selected": selected, "test": test, **extra}


def this_process() -> dict[str, int]:
    """Each process reads its rows of every global batch (as in pre-training)."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


class ProtocolEvaluator:
    """An :class:`Evaluator` running one registered protocol on a subject."""

    needs_labels: ClassVar[bool] = True
    reads_monitor_data: ClassVar[bool] = True
    protocol_fn: ClassVar[ProtocolFn]

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *,
                 store: SweepStore | None = None):
        self._config = config
        self._mesh = mesh
        self._store = store or SweepStore(None)
        self._opened: dict[str, OpenedSplit] = {}

    def open_splits(self) -> None:
        """Opens (and verifies) the three splits now, not at the first run: a training monitor
        fails at start-up on a bad split instead of at every monitoring step, and reads each
        manifest once."""
        for key in SPLIT_KEYS:
            self._opened[key] = labelled_split(self._config, key)

    def run(self, subject: PretrainedEncoder) -> dict[str, Any]:
        identity = json.dumps(subject.origin, sort_keys=True)
        ctx = Context(self._config, subject, self._mesh, self._store, identity,
                      opened_splits=dict(self._opened))
        return type(self).protocol_fn(ctx)


def protocol(name: str, *, needs_labels: bool = True, reads_monitor_data: bool = True
             ) -> Callable[[ProtocolFn], ProtocolFn]:
    """Registers the protocol ``run_<name>(ctx) -> result(...)`` as the evaluator ``name``:
    selectable with ``config.protocol`` (the CLI) and ``config.monitor.evaluators`` (during
    pre-training)."""

    def register(fn: ProtocolFn) -> ProtocolFn:
        evaluator = type(f"{name}_evaluator", (ProtocolEvaluator,), {
            "protocol_fn": staticmethod(fn), "needs_labels": needs_labels,
            "reads_monitor_data": reads_monitor_data, "__doc__": fn.__doc__})
        EVALUATORS.register(name)(evaluator)
        return fn

    return register


def needs_labels(factory: EvaluatorFactory) -> bool:
    """Whether a registered evaluator reads labels (one default for evaluators registered
    without the attribute: they do not)."""
    return getattr(factory, "needs_labels", False)


def reads_monitor_data(factory: EvaluatorFactory) -> bool:
    """Whether a registered evaluator reads ``config.monitor.data_dir`` as a monitor."""
    return getattr(factory, "reads_monitor_data", False)
