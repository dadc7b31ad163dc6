"""The epochs: shuffle, step through the batches, measure, save (``network2.Network.SGD``).

Each epoch visits every training example once in a fresh random order. The order is drawn
on the host, from the numpy generator kept in the training state: a ``jax.random.permutation``
program takes most of a second to compile on a small CPU, longer than a whole digits epoch,
and the generator's state goes into the checkpoint, so a resumed run draws exactly the orders
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.checkpoint import atomic_write_json
from experiments.data import Dataset
from experiments.mlp.config import COSTS, TrainConfig
from experiments.mlp.model import Params
from experiments.mlp.report import metrics_record
from experiments.mlp.state import TrainState, init_state
from experiments.mlp.step import StepFn, make_evaluate, make_train_step
from experiments.mlp.storage import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    restore_state,
    save_state,
)

__all__ = ["DIVERGENCE_FACTOR", "DivergenceError", "run_compare", "train"]

Log = Callable[[str], None]

#: An epoch whose training loss is this many times the starting parameters' has diverged.
DIVERGENCE_FACTOR = 10.0


class DivergenceError(RuntimeError):
    """Training diverged: an epoch's training loss was not finite, or more than
    :data:`DIVERGENCE_FACTOR` times the loss of the starting parameters. That epoch was not
    saved; ``saved_epoch`` is the last epoch on disk (0: nothing saved)."""

    def __init__(self, config: TrainConfig, epoch: int, loss: float, start_loss: float,
                 out: Path | None, saved_epoch: int) -> None:
        self.saved_epoch = saved_epoch
        if out is None:
            kept = "nothing was saved"
        elif saved_epoch:
            kept = f"the checkpoint of epoch {saved_epoch}, the last good one, is kept in {out}"
        else:
            kept = f"nothing was saved in {out}"
        super().__init__(
            f"{config.cost} diverged in epoch {epoch}: training loss {loss:.6g}, against"
            f" {start_loss:.4g} for the starting parameters; {kept}"
        )


def _epoch_order(rng: np.random.Generator, n: int, padded: int) -> jax.Array:
    """The next epoch's shuffled example order, padded with index 0 to ``padded`` entries."""
    order = np.zeros(padded, dtype=np.int32)
    order[:n] = rng.permutation(n)
    return jnp.asarray(order)


def _starting_state(
    config: TrainConfig, dataset: Dataset, resume_from: Path | None, say: Log
) -> TrainState:
    """The checkpoint in ``resume_from`` when there is one, else a fresh state."""
    if resume_from is not None:
        path = resume_from / CHECKPOINT_NAME
        if path.is_file():
            state = restore_state(path, config, dataset)
            say(f"resumed from {path} after epoch {state.epoch}")
            if state.epoch >= config.epochs:
                say(f"nothing to train: the checkpoint is at epoch {state.epoch}/{config.epochs}")
            return state
        say(f"no checkpoint at {path}; starting from epoch 0")
    return init_state(config, dataset.num_features, dataset.num_classes)


def _run_batches(
    step: StepFn,
    params: Params,
    opt_state: optax.OptState,
    train_set: tuple[jax.Array, jax.Array],
    order: jax.Array,
    num_batches: int,
    bar: Any,
) -> tuple[Params, optax.OptState]:
    """One pass of minibatch steps over ``order``, ticking the progress bar if there is one."""
    # Refreshing the bar on every one of thousands of tiny steps would cost more than the
    # steps; about 20 updates per epoch look just as smooth.
    bar_every = max(1, num_batches // 20)
    x, y = train_set
    for i in range(num_batches):
        params, opt_state = step(params, opt_state, x, y, order, i)
        if bar is not None and ((i + 1) % bar_every == 0 or i + 1 == num_batches):
            bar.update((i + 1) - bar.n)
    return params, opt_state


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Log | None = None,
) -> TrainState:
    """Trains an MLP on ``dataset`` for ``config.epochs`` epochs and returns the final state.

    Args:
      config: hyper-parameters.
      dataset: the data (see :mod:`experiments.data`).
      out_dir: if given, ``metrics.json`` and ``checkpoint.npz`` are rewritten there after
        every epoch.
      resume: continue from ``out_dir/checkpoint.npz`` when it exists (up to
        ``config.epochs``); when it does not, training starts from epoch 0.
      progress: show a per-epoch progress bar (``tqdm``) over the batches.
      log: called with one line per epoch (and one on resume); silent when ``None``.

    Raises:
      CheckpointError: ``resume`` found a checkpoint that is unreadable or from another run.
      DivergenceError: an epoch's training loss was not finite or more than
        :data:`DIVERGENCE_FACTOR` times the starting parameters'; that epoch is not saved.
    """
    say = log or (lambda _line: None)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume needs an output directory holding the checkpoint")
    state = _starting_state(config, dataset, out if resume else None, say)

    n_train = int(dataset.x_train.shape[0])
    num_batches = -(-n_train // config.batch_size)
    train_set = (jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train))
    test_set = (jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
    step = make_train_step(config, n_train)
    evaluate = make_evaluate(config, n_train)
    # The yardstick of divergence: the loss of the run's starting parameters (recomputed for a
    # resumed run, whose fresh state is the same for the same seed).
    start = state if state.epoch == 0 else init_state(
        config, dataset.num_features, dataset.num_classes)
    start_loss = float(evaluate(start.params, (train_set, test_set))[0][1])
    first_epoch = state.epoch

    bar = None
    if progress:
        from tqdm.auto import tqdm  # optional extra, imported only when asked for

        bar = tqdm(total=num_batches, unit="batch", leave=False, dynamic_ncols=True)
    try:
        for epoch in range(state.epoch, config.epochs):
            t0 = time.perf_counter()
            order = _epoch_order(state.rng, n_train, num_batches * config.batch_size)
            if bar is not None:
                bar.reset()
                bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            params, opt_state = _run_batches(
                step, state.params, state.opt_state, train_set, order, num_batches, bar
            )
            (train_acc, train_loss), (test_acc, _) = evaluate(params, (train_set, test_set))
            seconds = time.perf_counter() - t0
            if not math.isfinite(train_loss) or train_loss > DIVERGENCE_FACTOR * start_loss:
                raise DivergenceError(config, epoch + 1, train_loss, start_loss, out,
                                      state.epoch if out is not None else 0)

            state.params, state.opt_state, state.epoch = params, opt_state, epoch + 1
            for key, value in (
                ("train_loss", train_loss),
                ("train_accuracy", train_acc),
                ("test_accuracy", test_acc),
                ("epoch_seconds", seconds),
            ):
                state.history[key].append(value)
            if out is not None:
                save_state(out, config, dataset, state)
            say(
                f"{config.cost:>10}  epoch {epoch + 1:3d}/{config.epochs}  train loss"
                f" {train_loss:.4f}  train acc {train_acc:.4f}  test acc {test_acc:.4f}"
                f"  ({seconds:.2f} s)"
            )
    finally:
        if bar is not None:
            bar.close()
    state.epochs_run = state.epoch - first_epoch
    if out is not None and not state.epochs_run:
        # Nothing to train (a resume past --epochs): metrics.json is rewritten from the
        # checkpoint, as the run that wrote it left it, so the two never disagree; the
        # checkpoint itself is untouched.
        reached = dataclasses.replace(config, epochs=state.epoch)
        atomic_write_json(out / METRICS_NAME, metrics_record(reached, dataset, state))
    return state


def run_compare(
    config: TrainConfig,
    dataset: Dataset,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    progress: bool = False,
    log: Log | None = None,
    costs: tuple[str, ...] = COSTS,
) -> dict[str, TrainState]:
    """Trains one network per cost, same seed and hyper-parameters, in ``out_dir/<cost>/``
    (or in memory only when ``out_dir`` is ``None``).

    The same seed gives every run the same initial weights and the same batch order, so the
    curves differ only by the cost.
    """
    return {
        cost: train(
            dataclasses.replace(config, cost=cost),
            dataset,
            out_dir=None if out_dir is None else Path(out_dir) / cost,
            resume=resume,
            progress=progress,
            log=log,
        )
        for cost in costs
    }
