"""The compiled programs: one training step and one evaluation (``network2.update_mini_batch``).

Where ``network2.py`` calls ``backprop`` for each example and averages the nablas by hand, the
step here asks ``jax.grad`` for the gradient of the batch loss; the chain rule runs through
the library's ``custom_vjp`` rules, whose output error is :math:`a - y`. The optimiser then
applies the update (``optax.sgd`` is Nielsen's ``w - eta * nabla_w``).

Compiling costs far more than a digits epoch on a small CPU, so each program is built once
per set of hyper-parameters that can change it and kept in a cache (see :func:`program_key`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from experiments.mlp.config import TrainConfig
from experiments.mlp.costs import l2_penalty, per_example_cost
from experiments.mlp.model import Params, forward

__all__ = [
    "EvalFn",
    "StepFn",
    "make_evaluate",
    "make_optimizer",
    "make_train_step",
    "program_key",
]

# Evaluation runs over the data in chunks of at most this many examples, to bound the
# activation memory on MNIST-sized sets with wide layers.
_EVAL_CHUNK = 10_000

StepFn = Callable[
    [Params, optax.OptState, jax.Array, jax.Array, jax.Array, int],
    tuple[Params, optax.OptState],
]
EvalFn = Callable[[Params, tuple[tuple[jax.Array, jax.Array], ...]], list[tuple[float, float]]]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.sgd`` (plain gradient descent, as in the notes) or ``optax.adam``."""
    if config.optimizer == "sgd":
        return optax.sgd(config.eta)
    return optax.adam(config.eta)


def program_key(config: TrainConfig) -> TrainConfig:
    """``config`` without the fields that never change a compiled program.

    The compiled step, evaluation and initialisation are cached under this key, so that
    repeated or resumed runs in one process (tests, ``--compare`` re-runs) compile once.
    Layer sizes need not be in it: ``jax.jit`` specialises on argument shapes by itself.
    """
    return dataclasses.replace(config, epochs=0, seed=0, hidden=())


def make_train_step(config: TrainConfig, n_train: int) -> StepFn:
    """A jit-compiled step ``(params, opt_state, x, y, order, i) -> (params, opt_state)``.

    The step trains on batch ``i`` of the epoch, i.e. the examples
    ``order[i * batch : (i + 1) * batch]``. The whole training set stays on the device and
    only the index ``i`` crosses from Python, so a step costs one dispatch and no copy.
    ``order`` is the epoch's permutation padded to a whole number of batches; positions at or
    past ``n_train`` are padding and get weight 0.

    Compiled functions are cached per hyper-parameters (see :func:`program_key`).
    """
    return _compiled_step(program_key(config), n_train)


@functools.lru_cache(maxsize=64)
def _compiled_step(config: TrainConfig, n_train: int) -> StepFn:
    optimizer = make_optimizer(config)
    batch = config.batch_size

    def objective(params: Params, x: jax.Array, y: jax.Array, weight: jax.Array) -> jax.Array:
        costs = per_example_cost(config.cost, forward(params, x), y)
        mean = jnp.sum(weight * costs) / jnp.sum(weight)
        return mean + l2_penalty(params, config.l2, n_train)

    @jax.jit
    def step(params, opt_state, x, y, order, i):
        start = i * batch
        idx = jax.lax.dynamic_slice_in_dim(order, start, batch)
        weight = (start + jnp.arange(batch) < n_train).astype(x.dtype)
        grads = jax.grad(objective)(params, x[idx], y[idx], weight)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def make_evaluate(config: TrainConfig, n_train: int) -> EvalFn:
    """A function ``(params, ((x, y), ...)) -> [(accuracy, loss), ...]``, one pair per set.

    The loss is the training objective: the mean cost plus the L2 term (scaled by the
    training-set size ``n_train``, as in training). The prediction is the largest output,
    which is the same unit for the softmax and the sigmoid outputs.

    All sets are scored by one compiled program (one compilation instead of one per set,
    which matters at start-up), in chunks of at most 10,000 examples so that activation
    memory stays bounded on MNIST-sized sets with wide layers.
    """
    return _compiled_evaluate(program_key(config), n_train)


@functools.lru_cache(maxsize=64)
def _compiled_evaluate(config: TrainConfig, n_train: int) -> EvalFn:

    @jax.jit
    def sums(params: Params, sets: tuple[tuple[jax.Array, jax.Array], ...]):
        penalty = l2_penalty(params, config.l2, n_train)
        out = []
        for x, y in sets:
            cost_sum, correct = jnp.float32(0.0), jnp.int32(0)
            for s in range(0, x.shape[0], _EVAL_CHUNK):  # static shapes: unrolled at trace
                logits = forward(params, x[s : s + _EVAL_CHUNK])
                labels = y[s : s + _EVAL_CHUNK]
                cost_sum += jnp.sum(per_example_cost(config.cost, logits, labels))
                correct += jnp.sum(jnp.argmax(logits, axis=-1) == labels, dtype=jnp.int32)
            out.append((correct, cost_sum / x.shape[0] + penalty))
        return out

    def evaluate(params, sets):
        results = jax.device_get(sums(params, tuple(sets)))
        return [
            (int(correct) / int(x.shape[0]), float(loss))
            for (correct, loss), (x, _) in zip(results, sets, strict=True)
        ]

    return evaluate
