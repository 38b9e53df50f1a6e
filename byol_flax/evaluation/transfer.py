"""Appendix E.2: l2-regularised multinomial logistic regression on frozen features, by L-BFGS.

Objective (per regularisation value l2): mean cross-entropy of (x W + b) + l2 / 2 * ||W||^2, the
bias unpenalised. This equals scikit-learn's ``LogisticRegression(C=1 / (l2 * n))`` up to the
factor C n, so the same optimum. Fitted with ``optax.lbfgs`` (zoom line search) inside one
``jax.lax.while_loop``, on the accelerator; along the grid, from strongest to weakest
regularisation, each fit starts from the previous optimum (the problem is strictly convex, so
warm starts change the path, not the answer).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu


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
           max_iterations: jax.Array, tolerance: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
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
