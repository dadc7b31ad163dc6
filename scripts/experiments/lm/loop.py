"""The training loop of the next-token experiments: jitted steps and held-out evaluation.

One loop serves every model of :mod:`experiments.lm`: ``train_lm.py`` trains with
the default objective (the fused cross-entropy of :func:`~.model.loss_fn`), and
``distill_lm.py`` passes its own objective and the teacher's parameters as ``frozen``. Only
the objective differs between the two students, so their batches, initial parameters and
evaluations are the same and their perplexities compare like for like.

With an output directory the loop writes a checkpoint (:mod:`.checkpoint`) at every
evaluation and at the end, so an interrupted run loses at most ``eval_every`` steps and
resumes bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.cli import step_bar
from experiments.lm.checkpoint import (
    CHECKPOINT_NAME,
    TrainState,
    fresh_state,
    restore_state,
    save_state,
)
from experiments.lm.corpus import Corpus, windows
from experiments.lm.model import PAD_LABEL, LMConfig, Params, _head_token_block, loss_fn

__all__ = [
    "Objective",
    "TrainResult",
    "evaluate",
    "make_train_step",
    "train",
]

#: ``objective(params, contexts, targets, frozen) -> scalar loss``; ``frozen`` is a pytree of
#: constants (a teacher's parameters) that gets no gradient.
Objective = Callable[[Params, jax.Array, jax.Array, Any], jax.Array]


def make_train_step(
    cfg: LMConfig,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    objective: Objective | None = None,
) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """A jitted ``step(params, opt_state, contexts, targets, frozen=None) -> (params,
    opt_state, loss)``: batches sharded along ``"data"``, everything else replicated.

    ``frozen`` is an argument rather than a closure so that a teacher's parameters are not
    baked into the compiled program as constants.
    """
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    token_block = _head_token_block(cfg, mesh)

    def default(params, contexts, targets, frozen):
        return loss_fn(params, contexts, targets, cfg, token_block=token_block)

    fn = objective or default

    def step(params, opt_state, contexts, targets, frozen):
        loss, grads = jax.value_and_grad(fn)(params, contexts, targets, frozen)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(
        step,
        in_shardings=(rep, rep, data, data, rep),
        out_shardings=rep,
        donate_argnums=(0, 1),
    )

    def call(params, opt_state, contexts, targets, frozen=None):
        return jitted(params, opt_state, contexts, targets, {} if frozen is None else frozen)

    return call


def _make_eval_sum(cfg: LMConfig, mesh: Mesh) -> Callable[..., jax.Array]:
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    token_block = _head_token_block(cfg, mesh)

    def total(params, contexts, targets):
        return loss_fn(params, contexts, targets, cfg, reduction="sum", token_block=token_block)

    return jax.jit(total, in_shardings=(rep, data, data), out_shardings=rep)


def _eval_positions(n_tokens: int, context: int, limit: int) -> np.ndarray:
    """Up to ``limit`` positions evenly spread over a token array (all of them if fewer)."""
    available = n_tokens - context
    if available <= 0:
        return np.zeros((0,), np.int64)
    if available <= limit:
        return np.arange(context, n_tokens)
    return np.linspace(context, n_tokens - 1, limit).round().astype(np.int64)


def evaluate(
    params: Params,
    tokens: np.ndarray,
    cfg: LMConfig,
    mesh: Mesh,
    max_positions: int,
    eval_sum: Callable[..., jax.Array] | None = None,
) -> dict[str, float]:
    """Mean loss and perplexity of next-token prediction at up to ``max_positions``
    positions of ``tokens``; the last batch is padded with ignored labels."""
    eval_sum = eval_sum or _make_eval_sum(cfg, mesh)
    positions = _eval_positions(len(tokens), cfg.context, max_positions)
    if len(positions) == 0:
        raise ValueError(f"need more than context={cfg.context} tokens to evaluate")
    total = 0.0
    bs = cfg.batch_size
    for start in range(0, len(positions), bs):
        chunk = positions[start : start + bs]
        contexts, targets = windows(tokens, chunk, cfg.context)
        pad = bs - len(chunk)
        if pad:
            contexts = np.pad(contexts, ((0, pad), (0, 0)))
            targets = np.pad(targets, (0, pad), constant_values=PAD_LABEL)
        total += float(eval_sum(params, contexts, targets))
    mean = total / len(positions)
    return {"loss": mean, "perplexity": math.exp(mean), "positions": int(len(positions))}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """One run's final parameters and record; ``summary()`` is its JSON form."""

    params: Params
    history: list[dict[str, float]]  # per step: step, train_loss
    evals: list[dict[str, float]]  # per evaluation: step, heldout_loss, heldout_perplexity
    final: dict[str, float]
    seconds: float  # of this process's run (a resumed run counts from the resume)
    config: LMConfig
    devices: int
    resumed_from: int = 0  # the checkpoint's step; 0 for a fresh run

    def summary(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "devices": self.devices,
            "seconds": self.seconds,
            "resumed_from_step": self.resumed_from,
            "final_heldout": self.final,
            "history": self.history,
            "evals": self.evals,
        }


def _check(cfg: LMConfig, corpus: Corpus, mesh: Mesh) -> None:
    if len(corpus.vocab) != cfg.vocab_size:
        raise ValueError(
            f"corpus vocabulary has {len(corpus.vocab)} tokens, config says {cfg.vocab_size}"
        )
    if cfg.batch_size % mesh.size:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by the {mesh.size} devices"
        )
    if len(corpus.train) <= cfg.context:
        raise ValueError(f"training text too short for context={cfg.context}")


def _start(
    cfg: LMConfig,
    corpus: Corpus,
    optimizer: optax.GradientTransformation,
    checkpoint: Path | None,
    resume: bool,
    log: Callable[[str], object],
) -> TrainState:
    """A fresh state, or the checkpoint's when resuming and there is one."""
    if resume and checkpoint is None:
        raise ValueError("resume needs an output directory holding the checkpoint")
    if resume and checkpoint is not None and checkpoint.is_file():
        state = restore_state(checkpoint, cfg, corpus, optimizer)
        log(f"resumed from {checkpoint} at step {state.step}")
        if state.step >= cfg.steps:
            log(f"nothing to train: the checkpoint is at step {state.step}/{cfg.steps}")
        return state
    if resume:
        log(f"no checkpoint at {checkpoint}; starting from step 0")
    return fresh_state(cfg, optimizer)


def train(
    cfg: LMConfig,
    corpus: Corpus,
    mesh: Mesh,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    objective: Objective | None = None,
    frozen: Any = None,
    progress: bool = False,
    desc: str = "train",
    log: Callable[[str], object] = print,
) -> TrainResult:
    """Trains with Adam on random windows of the training text; evaluates the cross-entropy on
    held-out text every ``eval_every`` steps and at the end.

    Args:
      out_dir: if given, ``checkpoint.npz`` there is rewritten at every evaluation.
      resume: continue from ``out_dir/checkpoint.npz`` when it exists, up to ``cfg.steps``.
      objective: the training loss (default: the fused cross-entropy of ``loss_fn``);
        evaluations always measure the cross-entropy.
      frozen: constants passed to ``objective``, e.g. a teacher's parameters.

    Raises:
      CheckpointError: ``resume`` found a checkpoint that is unreadable or from another run.
    """
    _check(cfg, corpus, mesh)
    optimizer = optax.adam(cfg.learning_rate)
    checkpoint = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    state = _start(cfg, corpus, optimizer, checkpoint, resume, log)
    resumed_from = state.step
    rep = NamedSharding(mesh, P())
    state.params, state.opt_state = jax.device_put((state.params, state.opt_state), rep)
    frozen = jax.device_put(frozen, rep) if frozen is not None else None
    step_fn = make_train_step(cfg, mesh, optimizer, objective)
    eval_sum = _make_eval_sum(cfg, mesh)

    def run_eval() -> None:
        m = evaluate(state.params, corpus.heldout, cfg, mesh, cfg.eval_positions, eval_sum)
        state.evals.append({"step": state.step, "heldout_loss": m["loss"],
                            "heldout_perplexity": m["perplexity"]})

    steps: Iterable[int] = range(state.step + 1, cfg.steps + 1)
    bar = step_bar(steps, desc, state.step, cfg.steps) if progress else None
    steps = bar if bar is not None else steps
    start = time.perf_counter()
    if state.step == 0:
        run_eval()
    for step in steps:
        positions = state.rng.integers(cfg.context, len(corpus.train), size=cfg.batch_size)
        contexts, targets = windows(corpus.train, positions, cfg.context)
        state.params, state.opt_state, loss = step_fn(
            state.params, state.opt_state, contexts, targets, frozen)
        state.step = step
        state.history.append({"step": step, "train_loss": float(loss)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval()
            if checkpoint is not None:
                save_state(checkpoint, state, cfg, corpus)
        if bar is not None:
            bar.set_postfix(loss=f"{state.history[-1]['train_loss']:.3f}",
                            heldout_ppl=f"{state.evals[-1]['heldout_perplexity']:.1f}")
    if bar is not None:
        bar.close()
    final = evaluate(state.params, corpus.heldout, cfg, mesh, cfg.final_eval_positions, eval_sum)
    seconds = time.perf_counter() - start
    log(f"held-out perplexity {final['perplexity']:.2f} (loss {final['loss']:.4f} nats) on"
        f" {final['positions']} positions after {state.step} steps, {seconds:.1f} s")
    return TrainResult(state.params, state.history, state.evals, final, seconds, cfg,
                       mesh.size, resumed_from)
