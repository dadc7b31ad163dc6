"""What a run carries from epoch to epoch, and how a fresh run starts.

``network2.py`` keeps its weights on the ``Network`` object and draws its shuffles from the
global ``random`` module; here everything that decides the rest of the trajectory (weights,
optimiser state, the shuffling generator, the epoch count) is one explicit value, which is
exactly what the checkpoint stores.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax

from experiments.mlp.config import TrainConfig
from experiments.mlp.model import Params, init_params
from experiments.mlp.step import make_optimizer, program_key

__all__ = ["TrainState", "init_state"]


def _empty_history() -> dict[str, list[float]]:
    return {"train_loss": [], "train_accuracy": [], "test_accuracy": [], "epoch_seconds": []}


@dataclass
class TrainState:
    """Everything needed to continue training: written to and read from the checkpoint.

    Attributes:
      params: network parameters.
      opt_state: the optax optimiser state.
      rng: the generator that draws each epoch's example order.
      epoch: number of completed epochs.
      history: per-epoch metrics so far (``train_loss``, ``train_accuracy``,
        ``test_accuracy``, ``epoch_seconds``).
      epochs_run: the epochs trained by the :func:`~.loop.train` call that returned this
        state (0 when a resumed run had nothing to train); not stored in the checkpoint.
    """

    params: Params
    opt_state: optax.OptState
    rng: np.random.Generator
    epoch: int = 0
    history: dict[str, list[float]] = field(default_factory=_empty_history)
    epochs_run: int = 0


@functools.lru_cache(maxsize=64)
def _compiled_init(key: TrainConfig, sizes: tuple[int, ...]) -> Callable[[jax.Array], Any]:
    # One program for the whole initialisation: run eagerly, every small op (each random
    # draw, each zeros_like of the optimiser state) would be compiled on its own.
    optimizer = make_optimizer(key)

    @jax.jit
    def init(rng_key: jax.Array) -> tuple[Params, optax.OptState]:
        params = init_params(rng_key, sizes)
        return params, optimizer.init(params)

    return init


def init_state(config: TrainConfig, num_features: int, num_classes: int) -> TrainState:
    """A fresh training state: initial parameters, optimiser state and shuffling generator.

    Only the seed and the layer sizes matter (not the cost or the rate), so runs that differ
    in their cost start from identical weights and see the same batches.
    """
    init = _compiled_init(program_key(config), (num_features, *config.hidden, num_classes))
    params, opt_state = init(jax.random.key(config.seed))
    return TrainState(params=params, opt_state=opt_state, rng=np.random.default_rng(config.seed))
