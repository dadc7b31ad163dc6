"""The GRPO loop: supervised warm-up, then sample, score, normalise, update; held-out
evaluation, checkpoints and the plot.

1. Warm-up: ``warmup_steps`` of teacher-forced cross-entropy on correct completions
   (:func:`softmax_jax.linear_softmax_cross_entropy`), so that sampled completions earn
   some reward. The policy after the warm-up is the frozen reference of the KL penalty.
2. Each GRPO step draws ``prompts`` prompts, samples ``group`` completions of each at
   temperature 1, scores them (:class:`~.task.ReverseTask`), normalises the rewards within
   each group, and makes ``updates`` Adam updates on the clipped-ratio objective
   (:mod:`.objective`) against the log-probabilities of sampling time.

Evaluation samples one completion of each held-out prompt (drawn once from a separate seed)
and reports the mean reward with its standard error, the k3 estimate of the KL to the
reference, and the policy's entropy, per token. A checkpoint after the warm-up and at every
evaluation holds everything the next step depends on, so ``--resume`` continues the run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softmax_jax as sj
from experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from experiments.checks import positive_ints, positive_number
from experiments.cli import step_bar
from experiments.grpo.objective import (
    Batch,
    Weights,
    group_advantages,
    grpo_loss,
    materialised_grpo_loss,
    policy_log_probs,
)
from experiments.grpo.task import ReverseTask
from experiments.lm.model import LMConfig, Params, features, init_params

__all__ = ["CHECKPOINT_NAME", "GRPOConfig", "GRPOResult", "evaluate", "plot_rewards",
           "saved_step", "step_memory", "train"]

CHECKPOINT_NAME = "checkpoint.npz"
_FORMAT = "softmax_jax.grpo/1"


@dataclass(frozen=True)
class GRPOConfig:
    """The settings of ``scripts/train_grpo.py``."""

    symbols: int = 31
    length: int = 4
    embed_dim: int = 32
    hidden: int = 128
    warmup_steps: int = 40
    warmup_batch: int = 256
    warmup_learning_rate: float = 3e-3
    steps: int = 200
    prompts: int = 32
    group: int = 8
    updates: int = 2
    learning_rate: float = 2e-3
    clip: float = 0.2
    kl_weight: float = 0.04
    entropy_weight: float = 0.01
    eval_every: int = 25
    eval_prompts: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        ReverseTask(self.symbols, self.length)  # checks symbols and length
        positive_ints(self, ("embed_dim", "hidden", "warmup_batch", "prompts", "updates",
                             "eval_every", "eval_prompts"))
        if self.group < 2:
            raise ValueError(f"group must be at least 2 (advantages are within a group),"
                             f" got {self.group}")
        for name in ("warmup_steps", "steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        positive_number("learning_rate", self.learning_rate)
        positive_number("warmup_learning_rate", self.warmup_learning_rate)
        if not 0.0 < self.clip < 1.0:
            raise ValueError(f"clip must lie in (0, 1), got {self.clip}")
        for name in ("kl_weight", "entropy_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")

    @property
    def task(self) -> ReverseTask:
        return ReverseTask(self.symbols, self.length)

    @property
    def model(self) -> LMConfig:
        """The policy: the next-token model of :mod:`experiments.lm` over the task's tokens,
        its context holding the whole prompt and completion."""
        return LMConfig(vocab_size=self.task.vocab_size, context=2 * self.length,
                        embed_dim=self.embed_dim, hidden=self.hidden)

    @property
    def weights(self) -> Weights:
        return Weights(self.clip, self.kl_weight, self.entropy_weight)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trajectory (a run resumes only under the same ones;
        ``steps`` may grow, evaluations change nothing)."""
        d = dataclasses.asdict(self)
        for name in ("steps", "eval_every", "eval_prompts"):
            del d[name]
        return d


@dataclass
class GRPOResult:
    config: GRPOConfig
    step: int = 0
    warmup_losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "step": self.step,
                "warmup_losses": self.warmup_losses, "history": self.history,
                "evals": self.evals, "start": self.evals[0] if self.evals else None,
                "end": self.evals[-1] if self.evals else None}


# --------------------------------------------------------------------------------------------
# Sampling and evaluation
# --------------------------------------------------------------------------------------------


def _sample(cfg: GRPOConfig, params: Params, prompts: jax.Array, key: jax.Array) -> jax.Array:
    """``[n, length]`` completions sampled token by token at temperature 1 (generation
    needs each step's logits; only the loss avoids them)."""
    task, ctx = cfg.task, cfg.model.context
    done = jnp.zeros_like(prompts)
    for t in range(task.length):
        window = task.contexts(prompts, done, ctx)[:, t]
        z = features(params, window) @ params["head_w"] + params["head_b"]
        done = done.at[:, t].set(jax.random.categorical(jax.random.fold_in(key, t), z))
    return done


@functools.partial(jax.jit, static_argnums=0)
def _sampled_scores(cfg: GRPOConfig, params: Params, ref: Params, prompts: jax.Array,
                    key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per prompt the reward of one sample; per token its k3 to the reference, entropy."""
    comp = _sample(cfg, params, prompts, key)
    ctxs = cfg.task.contexts(prompts, comp, cfg.model.context)
    logp, ent = policy_log_probs(params, ctxs, comp)
    ref_logp, _ = policy_log_probs(ref, ctxs, comp)
    d = ref_logp - logp
    return cfg.task.reward(prompts, comp), jnp.exp(d) - d - 1.0, ent


def evaluate(cfg: GRPOConfig, params: Params, ref: Params, prompts: jax.Array,
             key: jax.Array) -> dict[str, float]:
    """Held-out ``reward`` (mean over prompts, one sample each) with its standard error
    ``reward_se``, and per token the ``kl`` (k3) to the reference and the ``entropy``."""
    r, k3, ent = _sampled_scores(_compiled(cfg), params, ref, prompts, key)
    r = np.asarray(r, np.float64)
    return {"reward": float(r.mean()), "reward_se": float(r.std(ddof=1) / math.sqrt(len(r))),
            "kl": float(jnp.mean(k3)), "entropy": float(jnp.mean(ent))}


def _compiled(cfg: GRPOConfig) -> GRPOConfig:
    """``cfg`` with the fields that do not enter a compiled step set to one value, so that
    runs differing only in them share the compiled programs."""
    return dataclasses.replace(cfg, steps=0, eval_every=1, eval_prompts=2)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _optimizers(cfg: GRPOConfig) -> tuple[optax.GradientTransformation, ...]:
    """``(warm-up, GRPO)`` Adam. GRPO's rate ramps up over 10 steps: Adam's first
    bias-corrected steps move every weight by the full rate, which on noisy policy
    gradients undoes part of the warm-up."""
    return (optax.adam(cfg.warmup_learning_rate),
            optax.adam(optax.linear_schedule(cfg.learning_rate / 10, cfg.learning_rate, 10)))


@functools.lru_cache(maxsize=8)
def _warmup_step(cfg: GRPOConfig):
    task, ctx, opt = cfg.task, cfg.model.context, _optimizers(cfg)[0]

    def loss(params, prompts):
        answers = task.answers(prompts)
        x = features(params, task.contexts(prompts, answers, ctx).reshape(-1, ctx))
        return sj.linear_softmax_cross_entropy(x, params["head_w"], answers.reshape(-1),
                                               params["head_b"])

    def step(params, opt_state, prompts):
        value, grads = jax.value_and_grad(loss)(params, prompts)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return jax.jit(step)


def _collect(cfg: GRPOConfig, params: Params, ref: Params, prompts: jax.Array,
             key: jax.Array) -> tuple[Batch, jax.Array]:
    """Samples ``group`` completions per prompt and scores them: ``(batch, rewards)``."""
    task = cfg.task
    rep = jnp.repeat(prompts, cfg.group, axis=0)
    comp = _sample(cfg, params, rep, key)
    rewards = task.reward(rep, comp)
    ctxs = task.contexts(rep, comp, cfg.model.context)
    old_logp, _ = policy_log_probs(params, ctxs, comp)
    ref_logp, _ = policy_log_probs(ref, ctxs, comp)
    batch = Batch(ctxs, comp, jnp.ones(comp.shape, bool), old_logp, ref_logp,
                  group_advantages(rewards, cfg.group))
    return batch, rewards


@functools.lru_cache(maxsize=8)
def _grpo_step(cfg: GRPOConfig):
    opt = _optimizers(cfg)[1]

    def step(params, opt_state, ref, prompts, key):
        batch, rewards = _collect(cfg, params, ref, prompts, key)
        for _ in range(cfg.updates):
            (loss, aux), grads = jax.value_and_grad(grpo_loss, has_aux=True)(
                params, batch, cfg.weights)
            updates, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "reward": jnp.mean(rewards), **aux}

    return jax.jit(step)


def step_memory(cfg: GRPOConfig) -> dict[str, float]:
    """Compiled temporaries (MiB) of one GRPO update's value and gradients at the model's
    vocabulary, fused and on the materialised logits (compiled, not run)."""
    params = init_params(jax.random.key(0), cfg.model)
    b, t = cfg.prompts * cfg.group, cfg.length
    batch = Batch(jax.ShapeDtypeStruct((b, t, cfg.model.context), jnp.int32),
                  jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), bool),
                  *(jax.ShapeDtypeStruct((b, t), jnp.float32) for _ in range(2)),
                  jax.ShapeDtypeStruct((b,), jnp.float32))
    out = {}
    for name, fn in (("fused", grpo_loss), ("materialised", materialised_grpo_loss)):
        grad = jax.value_and_grad(lambda p, bt, fn=fn: fn(p, bt, cfg.weights)[0])
        mem = jax.jit(grad).lower(params, batch).compile().memory_analysis()
        out[f"{name}_temp_mib"] = float(getattr(mem, "temp_size_in_bytes", 0)) / 2**20
    return out


# --------------------------------------------------------------------------------------------
# The run, its checkpoint and plot
# --------------------------------------------------------------------------------------------


def _tree(params, ref, opt_state, key):
    """The checkpointed state; ``key`` as raw key data (``jax.random.key_data``)."""
    return {"params": params, "ref": ref, "opt_state": opt_state, "key": key}


def saved_step(path: Path) -> int | None:
    """The GRPO step of the checkpoint at ``path`` (None when there is none to read)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            import json

            return int(json.loads(str(archive["meta"][()]))["step"])
    except (OSError, ValueError, KeyError):
        return None


def _restore(path: Path, cfg: GRPOConfig, template) -> tuple[Any, GRPOResult]:
    tree, meta = load_checkpoint(path, template)
    if meta.get("format") != _FORMAT:
        raise CheckpointError(path, "not a train_grpo.py checkpoint")
    if meta["identity"] != cfg.identity():
        diff = sorted(k for k in cfg.identity() if meta["identity"].get(k) != cfg.identity()[k])
        raise CheckpointError(path, f"was written with other settings ({', '.join(diff)});"
                                    " pass the same flags, or --overwrite to start over")
    if meta["step"] > cfg.steps:
        raise CheckpointError(path, f"is at step {meta['step']}, past --steps {cfg.steps}")
    result = GRPOResult(cfg, meta["step"], meta["warmup_losses"], meta["history"],
                        meta["evals"])
    return tree, result


def _save(path: Path, tree, result: GRPOResult) -> None:
    save_checkpoint(path, tree, {"format": _FORMAT, "identity": result.config.identity(),
                                 "step": result.step, "warmup_losses": result.warmup_losses,
                                 "history": result.history, "evals": result.evals})


def train(cfg: GRPOConfig, out_dir: Path | None = None, resume: bool = False,
          progress: bool = False, log: Callable[[str], object] = print) -> GRPOResult:
    """Warm-up then ``cfg.steps`` GRPO steps; evaluations at step 0 (the reference), every
    ``eval_every`` steps and at the end."""
    opt = _optimizers(cfg)[1]
    params = init_params(jax.random.key(cfg.seed), cfg.model)
    tree = _tree(params, params, opt.init(params),
                 jax.random.key_data(jax.random.key(cfg.seed + 1)))
    result = GRPOResult(cfg)
    path = None if out_dir is None else Path(out_dir) / CHECKPOINT_NAME
    if resume and path is not None and path.exists():
        tree, result = _restore(path, cfg, tree)
        log(f"resumed at GRPO step {result.step}")
    else:
        tree = _warmup(cfg, tree, result, log)
    eval_prompts = jnp.asarray(cfg.task.prompts(np.random.default_rng(cfg.seed + 10**6),
                                                cfg.eval_prompts, heldout=True))
    eval_key = jax.random.key(cfg.seed + 2)

    def record():
        ev = evaluate(cfg, tree["params"], tree["ref"], eval_prompts, eval_key)
        result.evals.append({"step": result.step, **ev})
        log(f"step {result.step}: held-out reward {ev['reward']:.3f} +- {ev['reward_se']:.3f},"
            f" KL to reference {ev['kl']:.4f}, entropy {ev['entropy']:.3f}")
        if path is not None:
            _save(path, tree, result)

    if not result.evals:
        record()
    step_fn = _grpo_step(_compiled(cfg))
    base_key = jax.random.wrap_key_data(jnp.asarray(tree["key"]))
    steps = range(result.step, cfg.steps)
    bar = step_bar(steps, "grpo", result.step, cfg.steps) if progress else steps
    for s in bar:
        # Each step's prompts and samples depend on its index alone: a resumed run draws
        # what the uninterrupted one would have.
        prompts = jnp.asarray(cfg.task.prompts(np.random.default_rng([cfg.seed, s]),
                                               cfg.prompts))
        key = jax.random.fold_in(base_key, s)
        tree["params"], tree["opt_state"], info = step_fn(
            tree["params"], tree["opt_state"], tree["ref"], prompts, key)
        result.step = s + 1
        result.history.append({"step": s + 1, **{k: float(v) for k, v in info.items()}})
        if result.step % cfg.eval_every == 0 or result.step == cfg.steps:
            record()
    if result.evals[-1]["step"] != result.step:
        record()
    return result


def _warmup(cfg: GRPOConfig, tree, result: GRPOResult, log) -> dict:
    warm, opt = _optimizers(cfg)
    step = _warmup_step(_compiled(cfg))
    rng = np.random.default_rng(cfg.seed)
    params, opt_state = tree["params"], warm.init(tree["params"])
    for _ in range(cfg.warmup_steps):
        prompts = jnp.asarray(cfg.task.prompts(rng, cfg.warmup_batch))
        params, opt_state, loss = step(params, opt_state, prompts)
        result.warmup_losses.append(float(loss))
    if cfg.warmup_steps:
        log(f"warm-up: {cfg.warmup_steps} supervised steps, cross-entropy"
            f" {result.warmup_losses[0]:.3f} -> {result.warmup_losses[-1]:.3f}")
    # The reference is the warmed-up policy; GRPO's Adam starts afresh.
    return _tree(params, params, opt.init(params), tree["key"])


def plot_rewards(result: GRPOResult, path: Path) -> None:
    """Held-out reward (with its standard error), training reward, KL and entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if result.history:
        ax.plot([h["step"] for h in result.history], [h["reward"] for h in result.history],
                alpha=0.3, label="training reward (per step)")
    steps = [e["step"] for e in result.evals]
    ax.errorbar(steps, [e["reward"] for e in result.evals],
                yerr=[e["reward_se"] for e in result.evals], marker="o", capsize=3,
                label="held-out reward")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward (fraction of positions right)")
    ax.legend()
    ax2.plot(steps, [e["kl"] for e in result.evals], marker="o", label="KL to reference (k3)")
    ax2.plot(steps, [e["entropy"] for e in result.evals], marker="s", label="entropy (nats)")
    ax2.set_xlabel("GRPO step")
    ax2.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
