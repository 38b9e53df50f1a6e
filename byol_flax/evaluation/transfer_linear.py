"""Transfer via linear classification (Appendix E.2): features without augmentation, an
l2-regularised multinomial logistic regression fitted by L-BFGS for 45 l2 values in [1e-6, 1e5]
chosen on the selection split, refit on train + selection, top-1 or mean per-class accuracy.

Objective (per regularisation value l2): mean cross-entropy of (x W + b) + l2 / 2 * ||W||^2, the
bias unpenalised. This equals scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` up to the
factor C n, so the same optimum. Fitted with ``optax.lbfgs`` (zoom line search) inside one
``jax.lax.while_loop``, on the accelerator; along the grid, from strongest to weakest
regularisation, each fit starts from the previous optimum (the problem is strictly convex, so
warm starts change the path, not the answer).
"""


import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from byol_flax.evaluation.base import Context, protocol, result, sweep
from byol_flax.evaluation.linear import linear_scores


def l2_grid(minimum: float, maximum: float, count: int) -> np.ndarray:
    """``count`` logarithmically spaced values in [minimum, maximum] (E.2: 45 in [1e-6, 1e5])."""
    return np.logspace(math.log10(minimum), math.log10(maximum), count)


def logistic_objective(params: dict[str, jax.Array], x: jax.Array, y: jax.Array,
                       l2: float | jax.Array) -> jax.Array:
    logits = x @ params["kernel"] + params["bias"]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"])))


@jax.jit
def _lbfgs(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, l2: jax.Array,
           max_iterations: jax.Array, tolerance: jax.Array
           ) -> tuple[dict[str, jax.Array], jax.Array]:
    objective = lambda p: logistic_objective(p, x, y, l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                       value_fn=objective)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad = otu.tree_get(state, "grad")
        return (count == 0) | ((count < max_iterations) & (otu.tree_norm(grad) >= tolerance))

    params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    return params, otu.tree_get(state, "count")


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, *, num_classes: int,
                            l2: float, max_iterations: int = 1000, tolerance: float = 1e-6,
                            init: dict[str, jax.Array] | None = None
                            ) -> tuple[dict[str, jax.Array], int]:
    """(params {"kernel", "bias"}, iterations) minimising :func:`logistic_objective`."""
    x = jnp.asarray(features, jnp.float32)
    params = init if init is not None else {
        "kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros(num_classes)}
    params, count = _lbfgs(params, x, jnp.asarray(labels, jnp.int32), jnp.float32(l2),
                           jnp.int32(max_iterations), jnp.float32(tolerance))
    return params, int(count)


@protocol("transfer_linear")
def run_transfer_linear(ctx: Context) -> dict[str, Any]:
    """Appendix E.2 on the encoder's features of the evaluation view."""
    cfg = ctx.config.transfer_linear
    train = ctx.features(ctx.train, limit=ctx.train_limit, resize_ratio=cfg.resize_ratio)
    selection = ctx.features(ctx.selection, limit=ctx.eval_limit, resize_ratio=cfg.resize_ratio)
    test = ctx.features(ctx.test, limit=ctx.eval_limit, resize_ratio=cfg.resize_ratio)
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
                                   fit, linear_scores(selection), metric=cfg.metric)
    if cfg.refit_on_train_and_selection:
        combined = (np.concatenate([train[0], selection[0]]),
                    np.concatenate([train[1], selection[1]]))
        params, _ = fit_logistic_regression(*combined, l2=selected["l2"], **fit_kwargs)
    else:
        params = params or fit_logistic_regression(*train, l2=selected["l2"], **fit_kwargs)[0]
    return result(ctx, "transfer_linear", rows, selected, linear_scores(test)(params),
                  metric=cfg.metric,
                  refit_on_train_and_selection=cfg.refit_on_train_and_selection)
