"""The programs the pre-flight compiles for a TPU, and what the compiler says of them.

byol-train's step (:func:`compile_step`) and the evaluation protocols' on-device steps
(:func:`compile_protocol`) are built from abstract arrays with the shardings a run gives them
(nothing is allocated, whatever the model's size) and compiled by libtpu: memory, FLOPs, the
program's collectives and the dtypes its convolutions and matmuls read (:func:`read_hlo`). A
program the compiler refuses for lack of HBM is a :class:`Compiled` with the figures it names.
"""

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


@dataclasses.dataclass
class Compiled:
    """What the compiler says about one compile of the step."""

    per_chip_batch: int  # the micro-batch one chip holds at once (accumulation splits the batch)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float | None
    collectives: dict[str, dict[str, int]]
    dot_dtypes: dict[str, int]
    seconds: float
    # The compiler refused the program: its temporaries need more than it can use of a chip's
    # HBM (``usable_bytes``, which it names); ``temp_bytes`` is then what they need.
    out_of_memory: bool = False
    usable_bytes: int | None = None
    hlo: str = dataclasses.field(default="", repr=False)  # the optimised module's text

    @property
    def per_chip_bytes(self) -> int:
        """What one chip holds while the step runs: its arguments (the donated state is reused
        for the output), the outputs that are not aliased, temporaries and the program."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


_OUT_OF_MEMORY = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _out_of_memory(error: Exception) -> tuple[int, int] | None:
    """(bytes the temporaries need, bytes available) of the TPU compiler's out-of-memory error
    ("the total memory required for HLO temporaries (99.80G) exceeds available HBM (30.75G)")."""
    match = _OUT_OF_MEMORY.search(str(error))
    if not match:
        return None
    return (int(float(match[1]) * _UNITS[match[2]]), int(float(match[3]) * _UNITS[match[4]]))


def _shape_bytes(text: str) -> int:
    return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _SHAPE.findall(text))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")


def read_hlo(hlo: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(collectives by kind: count and bytes of their results; convolutions and dots by their
    operands' dtypes, e.g. ``"convolution bf16"``, with ``->f32`` when the result differs:
    bfloat16 inputs accumulated in float32, as the MXU does anyway) in an HLO module's text.
    Optimised modules name their operands without types; each is looked up by name."""
    collectives: dict[str, dict[str, int]] = {}
    dots: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, result, op, rest = match.groups()
        result_dtype = _SHAPE.search(result)
        if result_dtype:
            dtypes[name] = result_dtype.group(1)
        op = op.removesuffix("-start")
        if op in ("convolution", "dot"):
            operands = re.findall(r"(?:(" + "|".join(_BYTES) + r")\[[\d,]*\]\S*\s+)?%([\w.\-]+)",
                                  rest.split(")", 1)[0])
            inputs = sorted({typed or dtypes.get(operand, "?") for typed, operand in operands})
            key = f"{op} {'+'.join(inputs)}"
            if result_dtype and inputs != [result_dtype.group(1)]:
                key += f"->{result_dtype.group(1)}"
            dots[key] = dots.get(key, 0) + 1
        elif op in COLLECTIVES:
            entry = collectives.setdefault(op, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += _shape_bytes(result)
    return collectives, dots


def dotted(config: ml_collections.ConfigDict, key: str) -> Any:
    """``config["a"]["b"]`` for ``key = "a.b"``."""
    for part in key.split("."):
        config = config[part]
    return config


def _num_classes(config: ml_collections.ConfigDict) -> int:
    if not config.model.online_classifier:
        return 0
    return int(config.data.get("num_classes", 0) or 1000)


def _per_device_bytes(arguments: Any, devices: int) -> int:
    """What ``arguments`` (abstract, with shardings) put on one device: a replicated array
    whole, an array split over the mesh one share."""
    import jax

    return sum(x.size * x.dtype.itemsize // (devices if x.sharding.spec else 1)
               for x in jax.tree.leaves(arguments))


def _compile(lower: Callable[[], Any], arguments: Any, per_chip_batch: int,
             devices: int) -> Compiled:
    """``lower()`` (a ``jit(...).lower(...)`` of ``arguments``) compiled by libtpu and what the
    compiler says of it; a program it refuses for lack of HBM is a :class:`Compiled` with
    ``out_of_memory`` and its figures."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    started = time.perf_counter()
    # A compile-only TPU client cannot load executables: keep them out of (and do not read
    # them from) a persistent compilation cache the process may use. JAX decides once per
    # process whether the cache is used: reset before and after so that the switch holds here
    # and the process's own setting holds again for its later compiles.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        compiled = lower().compile()
    except Exception as error:
        needed = _out_of_memory(error)
        if needed is None:
            raise
        return Compiled(per_chip_batch=per_chip_batch,
                        argument_bytes=_per_device_bytes(arguments, devices), output_bytes=0,
                        alias_bytes=0, temp_bytes=needed[0], code_bytes=0, flops=None,
                        collectives={}, dot_dtypes={}, out_of_memory=True,
                        usable_bytes=needed[1], seconds=time.perf_counter() - started)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
        compilation_cache.reset_cache()
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    collectives, dots = read_hlo(hlo)
    return Compiled(
        per_chip_batch=per_chip_batch, argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes, alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
        flops=cost.get("flops"), collectives=collectives, dot_dtypes=dots, seconds=seconds,
        hlo=hlo)


def _abstract(tree: Any, sharding: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)


def compile_step(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> Compiled:
    """Builds byol-train's step for ``config`` over ``devices`` and compiles it, abstractly."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from byol_flax.sharding import data_sharding, make_mesh, replicated_sharding
    from byol_flax.train_state import create_train_state
    from byol_flax.train_step import StepOptions, make_train_step

    mesh = make_mesh(devices)
    # The schedules' lengths are constants of the program: any run length compiles the same.
    options = StepOptions.from_config(config, total_steps=1000, warmup_steps=100)
    num_classes = _num_classes(config)
    abstract = create_train_state(config, options.learning_rate, num_classes=num_classes,
                                  abstract=True)
    graphdef, state = nnx.split(abstract)
    state = _abstract(state, replicated_sharding(mesh))
    size, batch = config.data.image_size, config.training.batch_size
    views = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=data_sharding(mesh))
    inputs = {"view1": views, "view2": views}
    if num_classes:
        inputs["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=data_sharding(mesh))
    step = make_train_step(graphdef, mesh, options)
    return _compile(lambda: step.lower(state, inputs), (state, inputs),
                    batch // config.training.accumulation_steps // len(devices), len(devices))


# The config section whose ``batch_size`` a protocol's on-device step holds; protocols on
# extracted features hold ``feature_batch_size`` images (the encoder's forward pass).
PROTOCOL_BATCH = {"linear": "linear", "semi_supervised": "semi_supervised",
                  "transfer_finetune": "transfer_finetune"}


def protocol_batch_key(eval_config: ml_collections.ConfigDict) -> str:
    """The dotted key of the batch the protocol's compiled step holds on device."""
    section = PROTOCOL_BATCH.get(eval_config.protocol)
    if section == "linear" and eval_config.linear.augment == "none":
        section = None  # a linear layer fitted on features extracted once
    return f"{section}.batch_size" if section else "feature_batch_size"


def compile_protocol(train_config: ml_collections.ConfigDict,
                     eval_config: ml_collections.ConfigDict,
                     devices: Sequence[Any]) -> Compiled:
    """The on-device step of ``eval_config``'s protocol on the encoder ``train_config``
    pre-trains, compiled abstractly over ``devices``: the linear protocol's step (frozen
    encoder, the grid of heads), fine-tuning's (the whole classifier), or the forward pass that
    extracts features (kNN, linear on features, transfer linear)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from byol_flax.evaluation import classifier as clf
    from byol_flax.evaluation import heads as heads_lib
    from byol_flax.evaluation import linear
    from byol_flax.models.byol import build_encoder_from_config
    from byol_flax.sharding import data_sharding, make_mesh, replicated_sharding

    mesh = make_mesh(devices)
    replicated, split = replicated_sharding(mesh), data_sharding(mesh)
    key = protocol_batch_key(eval_config)
    section = key.rpartition(".")[0]
    batch = dotted(eval_config, key)
    size, classes = eval_config.data.image_size, eval_config.data.num_classes
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8, sharding=split)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=split)
    rng = _abstract(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    def build() -> nnx.Module:  # its random generator inside the abstract trace
        return build_encoder_from_config(train_config.model, rngs=nnx.Rngs(0))

    per_chip = batch // len(devices)
    if section in ("semi_supervised", "transfer_finetune"):
        model = nnx.eval_shape(lambda: clf.Classifier(build(), classes, seed=0))
        model.train()
        graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
        spec = clf.sgd_spec(eval_config[section], 1000)
        opt_state = jax.eval_shape(spec.build(0.0).init, trainable)
        trainable, frozen, opt_state = _abstract((trainable, frozen, opt_state), replicated)
        hparams = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated)
        arguments = (trainable, frozen, opt_state, images, labels, rng, hparams)
        return _compile(lambda: clf._classifier_step.lower(
            *arguments, graphdef=graphdef, spec=spec, augment=None, tclip=(0.0, 0.0)),
            arguments, per_chip, len(devices))
    encoder = nnx.eval_shape(build)
    encoder.eval()
    graphdef, encoder_state = nnx.split(encoder)
    encoder_state = _abstract(encoder_state, replicated)
    if section == "linear":
        cfg = eval_config.linear
        spec = clf.sgd_spec(cfg, 1000)
        rates = len(cfg.learning_rates)
        heads = jax.eval_shape(lambda: heads_lib.zero_heads(rates, encoder.num_features,
                                                            classes))
        opt_state = jax.eval_shape(functools.partial(heads_lib.init_opt_state, spec), heads)
        heads, opt_state = _abstract((heads, opt_state), replicated)
        augment = linear.device_augment(eval_config)
        tclip = (cfg.tclip_alpha, cfg.tclip_beta) if cfg.tclip else (0.0, 0.0)
        learning_rates = jax.ShapeDtypeStruct((rates,), jnp.float32, sharding=replicated)
        arguments = (heads, opt_state, encoder_state, images, labels, rng, learning_rates)
        return _compile(lambda: heads_lib._heads_step.lower(
            *arguments, graphdef=graphdef, spec=spec, augment=augment, tclip=tclip),
            arguments, per_chip, len(devices))
    arguments = (encoder_state, images)
    return _compile(lambda: clf._inference.lower(*arguments, graphdef=graphdef), arguments,
                    per_chip, len(devices))
