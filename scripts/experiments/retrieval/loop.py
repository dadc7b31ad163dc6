"""The training loop: batches of pairs, the jitted step (on one device or a ring of them),
and the held-out evaluation.

Batches are drawn on the host from a seeded numpy ``Generator``: each epoch visits the
training pairs in a fresh random order, one batch of ``batch_size`` distinct pairs per step,
and the incomplete tail of an epoch is skipped (so a pair never meets itself as a negative).
With ``devices``, the batch is padded with empty pairs to a multiple of the device count
and the padding is masked out of the loss with ``where``, so any batch size runs on any
number of devices and gives the loss of the unpadded batch.

On devices the step is :func:`jax.shard_map` over a one-axis ``("data",)`` mesh: each device
embeds its slice of the batch with the replicated towers and the loss runs its ring along
``"data"``. The gradients of the replicated parameters come back summed over the devices,
because ``shard_map`` (with ``check_vma``) transposes the implicit broadcast of a replicated
input into a ``psum``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from experiments.cli import step_bar
from experiments.lm.model import make_mesh
from experiments.retrieval.config import RetrievalConfig
from experiments.retrieval.data import Encoded, PairSplit
from experiments.retrieval.metrics import retrieval_metrics
from experiments.retrieval.model import Params, batch_loss, embed, init_params

__all__ = [
    "Batch", "RunResult", "batches", "evaluate", "make_mesh", "make_train_step", "take_batch",
    "train",
]

#: (query tokens, query lengths, code tokens, code lengths, where)
Batch = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_AXIS = "data"
_EVAL_CHUNK = 1024


def take_batch(split: PairSplit, index: np.ndarray, multiple: int = 1) -> Batch:
    """The training pairs ``index``, padded with empty masked pairs to a multiple of
    ``multiple``."""
    pad = -len(index) % multiple

    def rows(a: np.ndarray) -> np.ndarray:
        a = a[index]
        return np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))

    q, c = split.train_query, split.train_code
    where = np.arange(len(index) + pad) < len(index)
    return rows(q.tokens), rows(q.lengths), rows(c.tokens), rows(c.lengths), where


def batches(split: PairSplit, batch_size: int, rng: np.random.Generator,
            multiple: int = 1) -> Iterable[Batch]:
    """Endless batches of distinct training pairs, epoch after epoch (see the module doc)."""
    n = len(split.train)
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 2 and the {n} training pairs,"
                         f" got {batch_size}")
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield take_batch(split, order[start : start + batch_size], multiple)


def make_train_step(
    cfg: RetrievalConfig, optimizer: optax.GradientTransformation, mesh: Mesh | None = None,
) -> Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]:
    """A jitted ``step(params, opt_state, batch) -> (params, opt_state, loss)``."""
    if mesh is None:
        grad_fn = jax.value_and_grad(partial(batch_loss, loss=cfg.loss))
    else:
        shard = P(_AXIS)
        grad_fn = jax.shard_map(
            jax.value_and_grad(partial(batch_loss, loss=cfg.loss, axis_name=_AXIS)),
            mesh=mesh,
            in_specs=(P(), shard, shard, shard, shard, shard),
            out_specs=(P(), P()),
        )

    def step(params, opt_state, batch):
        loss, grads = grad_fn(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


@partial(jax.jit, static_argnums=1)
def _embed_chunk(params: Params, side: str, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    return embed(params, side, tokens, lengths)


def embed_all(params: Params, side: str, enc: Encoded) -> np.ndarray:
    """Unit vectors of every row of ``enc``, in fixed-size chunks (one compilation)."""
    n = len(enc.lengths)
    chunk = min(_EVAL_CHUNK, n)
    out = []
    for start in range(0, n, chunk):
        tokens, lengths = enc.tokens[start : start + chunk], enc.lengths[start : start + chunk]
        pad = chunk - len(lengths)
        tokens, lengths = np.pad(tokens, ((0, pad), (0, 0))), np.pad(lengths, (0, pad))
        out.append(np.asarray(_embed_chunk(params, side, tokens, lengths))[: chunk - pad])
    return np.concatenate(out)


def evaluate(params: Params, query: Encoded, code: Encoded) -> dict[str, float]:
    """Retrieval metrics of every query against the whole pool of code (cosine scores)."""
    u = embed_all(params, "query", query)
    v = embed_all(params, "code", code)
    return retrieval_metrics(u @ v.T)


@dataclass
class RunResult:
    """One run's parameters and record; ``summary()`` is its JSON form."""

    params: Params
    history: list[dict[str, float]]  # per step: step, loss
    evals: list[dict[str, float]]  # per evaluation: step and the held-out metrics
    final: dict[str, float]
    seconds: float
    config: RetrievalConfig


def train(cfg: RetrievalConfig, split: PairSplit, *, progress: bool = False,
          log: Callable[[str], object] = print) -> RunResult:
    """Trains both towers with Adam; evaluates held-out retrieval every ``eval_every`` steps
    (and before the first and after the last)."""
    mesh = make_mesh(cfg.devices) if cfg.devices is not None else None
    multiple = cfg.devices or 1
    optimizer = optax.adam(cfg.learning_rate)
    params = init_params(jax.random.key(cfg.seed), cfg, len(split.vocab))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, optimizer, mesh)
    stream = iter(batches(split, cfg.batch_size, np.random.default_rng(cfg.seed), multiple))

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(params, split.heldout_query, split.heldout_code)
        evals.append({"step": step, **metrics})
        return metrics

    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    start = time.perf_counter()
    run_eval(0)
    bar = step_bar(range(1, cfg.steps + 1), "train", 0, cfg.steps) if progress else None
    for step in bar if bar is not None else range(1, cfg.steps + 1):
        params, opt_state, loss = step_fn(params, opt_state, next(stream))
        history.append({"step": step, "loss": float(loss)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval(step)
        if bar is not None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}",
                            r1=f"{evals[-1]['recall@1']:.3f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    final = evals[-1]
    log(f"held-out recall@1 {final['recall@1']:.3f}, recall@10 {final['recall@10']:.3f}"
        f" over {final['pool']} candidates (chance {final['random_recall@1']:.4f},"
        f" {final['random_recall@10']:.4f}) after {cfg.steps} steps, {seconds:.1f} s")
    return RunResult(params, history, evals, final, seconds, cfg)

