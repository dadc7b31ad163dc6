r"""A small next-token language model on Python's own standard library, with the fused head.

This is a real user of :func:`softmax_jax.fused.linear_softmax_cross_entropy`: a word-level
model whose output layer has a 32k vocabulary, trained data-parallel under :func:`jax.jit`.

* **Text.** The ``.py`` files of the running interpreter's standard library (about 30 MB,
  shipped with every Python, so nothing is downloaded). Files are split, not lines: every
  20th file in sorted order is held out, so held-out text is code the model never saw.
* **Tokens.** A word-level split by one regular expression: identifiers and words, runs of
  digits, newlines, and every other non-space character on its own (spaces and
  indentation are dropped). The vocabulary is ``<unk>`` plus the most frequent
  ``vocab_size - 1`` training tokens; with 32k it covers about 98% of the text.
* **Model.** Bengio et al.'s (2003) neural language model: the embeddings of the previous
  ``context`` tokens are concatenated, one GELU layer maps them to a ``hidden``-wide state
  :math:`x`, and the fused head computes the softmax cross-entropy of :math:`x W + b` over the
  whole vocabulary without materialising the ``batch x vocab`` logits.
* **Parallelism.** Batches are sharded over the local devices along a ``"data"`` mesh axis
  with :class:`jax.sharding.NamedSharding`, parameters are replicated, and XLA's SPMD
  partitioner does the rest (the gradient all-reduce included): the loss code is unchanged.
* **Metrics.** Training loss per step; held-out loss and perplexity
  :math:`e^{\text{mean loss}}` at intervals and at the end, next to the perplexity of a
  unigram model (token frequencies of the training text), which ignores context.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import sysconfig
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softmax_jax.fused import linear_softmax_cross_entropy

__all__ = [
    "UNK",
    "Corpus",
    "CorpusError",
    "LMConfig",
    "TrainResult",
    "build_vocab",
    "evaluate",
    "features",
    "init_params",
    "load_corpus",
    "loss_fn",
    "make_mesh",
    "make_train_step",
    "stdlib_files",
    "tokenize",
    "train",
    "unigram_perplexity",
    "windows",
]

UNK = "<unk>"
#: Identifiers/words, digit runs, newlines, and any other non-space character alone.
TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|\n|[^\sA-Za-z_0-9]")
# Label for padding positions in evaluation batches (skipped through ignore_index).
_PAD_LABEL = -1
# Rows of logits per device in one block of the fused head: about 2**23 logits (32 MiB).
_HEAD_BLOCK_ELEMENTS = 2**23

Params = dict[str, jax.Array]


class CorpusError(Exception):
    """The standard library's source could not be found or read."""


# --------------------------------------------------------------------------------------------
# Corpus and tokens
# --------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Word-level tokens of ``text``.

    Examples:
      >>> tokenize("def f(x):\\n    return x + 10")
      ['def', 'f', '(', 'x', ')', ':', '\\n', 'return', 'x', '+', '10']
    """
    return TOKEN_RE.findall(text)


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order (third-party packages excluded)."""
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise CorpusError(f"standard library folder {base} not found")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = sorted(
        p for p in base.rglob("*.py") if not skip.intersection(p.relative_to(base).parts)
    )
    if not files:
        raise CorpusError(f"no .py files under {base}")
    return files


def build_vocab(counts: collections.Counter[str], size: int) -> list[str]:
    """``[UNK]`` plus the ``size - 1`` most frequent tokens (ties broken alphabetically)."""
    if size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {size}")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK] + [tok for tok, _ in ranked[: size - 1] if tok != UNK]


def _encode(tokens: Iterable[str], index: dict[str, int]) -> np.ndarray:
    return np.fromiter((index.get(t, 0) for t in tokens), dtype=np.int32)


@dataclass
class Corpus:
    """Token ids of the training and held-out text, and the vocabulary (id 0 is ``<unk>``)."""

    train: np.ndarray
    heldout: np.ndarray
    vocab: list[str]
    train_files: int
    heldout_files: int
    train_counts: np.ndarray = field(repr=False)  # occurrences of each id in train

    def describe(self) -> dict[str, Any]:
        unk = float(np.mean(self.heldout == 0)) if len(self.heldout) else 0.0
        return {
            "vocab_size": len(self.vocab),
            "train_files": self.train_files,
            "heldout_files": self.heldout_files,
            "train_tokens": int(len(self.train)),
            "heldout_tokens": int(len(self.heldout)),
            "heldout_unk_rate": unk,
        }


def load_corpus(
    vocab_size: int = 32000,
    max_files: int | None = None,
    heldout_every: int = 20,
    root: str | Path | None = None,
) -> Corpus:
    """Reads, splits and encodes the standard library's source.

    Args:
      vocab_size: vocabulary size including ``<unk>``.
      max_files: use only this many files, evenly spaced through the sorted list (for quick
        runs and tests); None for all.
      heldout_every: every ``heldout_every``-th file (in sorted order) is held out; with
        fewer files than that, the last file is.
      root: the folder to read instead of the standard library.
    """
    if heldout_every < 2:
        raise ValueError(f"heldout_every must be at least 2, got {heldout_every}")
    files = stdlib_files(root)
    if max_files is not None:
        if max_files < 2:
            raise ValueError(f"max_files must be at least 2 (train + held-out), got {max_files}")
        step = max(1, len(files) // max_files)
        files = files[::step][:max_files]
    held = [i % heldout_every == heldout_every - 1 for i in range(len(files))]
    if not any(held):
        held[-1] = True
    split: dict[bool, list[str]] = {True: [], False: []}
    for path, is_held in zip(files, held, strict=True):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few test fixtures are deliberately not UTF-8
        split[is_held].extend(tokenize(text))
    if not split[False] or not split[True]:
        raise CorpusError(f"no readable text in the {len(files)} files chosen")
    counts = collections.Counter(split[False])
    vocab = build_vocab(counts, vocab_size)
    index = {tok: i for i, tok in enumerate(vocab)}
    train = _encode(split[False], index)
    heldout = _encode(split[True], index)
    return Corpus(
        train=train,
        heldout=heldout,
        vocab=vocab,
        train_files=held.count(False),
        heldout_files=held.count(True),
        train_counts=np.bincount(train, minlength=len(vocab)),
    )


def windows(tokens: np.ndarray, positions: np.ndarray, context: int) -> tuple[np.ndarray, ...]:
    """``(contexts [B, context], targets [B])``: the ``context`` tokens before each position
    and the token at it. Positions must be at least ``context``."""
    offsets = np.arange(-context, 0)
    return tokens[positions[:, None] + offsets], tokens[positions]


def unigram_perplexity(corpus: Corpus) -> float:
    """Held-out perplexity of token frequencies (add-one smoothed): the no-context baseline."""
    probs = (corpus.train_counts + 1.0) / (corpus.train_counts.sum() + len(corpus.vocab))
    return float(np.exp(-np.mean(np.log(probs[corpus.heldout]))))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMConfig:
    """Model and training settings (the flags of ``scripts/train_lm.py``)."""

    vocab_size: int = 32000
    context: int = 8
    embed_dim: int = 64
    hidden: int = 256
    batch_size: int = 1024
    steps: int = 300
    learning_rate: float = 3e-3
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    seed: int = 0
    eval_every: int = 50
    eval_positions: int = 8192
    final_eval_positions: int = 65536

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "embed_dim", "hidden", "batch_size",
                     "eval_every", "eval_positions", "final_eval_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")


def init_params(key: jax.Array, cfg: LMConfig) -> Params:
    """Embeddings N(0, 1), the hidden layer scaled by 1/sqrt(fan-in), and a zero head, so the
    first loss is exactly ``log(vocab_size)``."""
    k_embed, k_hidden = jax.random.split(key)
    fan_in = cfg.context * cfg.embed_dim
    return {
        "embed": jax.random.normal(k_embed, (cfg.vocab_size, cfg.embed_dim)),
        "w1": jax.random.normal(k_hidden, (fan_in, cfg.hidden)) / math.sqrt(fan_in),
        "b1": jnp.zeros((cfg.hidden,)),
        "head_w": jnp.zeros((cfg.hidden, cfg.vocab_size)),
        "head_b": jnp.zeros((cfg.vocab_size,)),
    }


def features(params: Params, contexts: jax.Array) -> jax.Array:
    """The ``[B, hidden]`` state fed to the head: GELU of the concatenated embeddings."""
    e = params["embed"][contexts]  # [B, context, embed_dim]
    e = e.reshape(contexts.shape[0], -1)
    return jax.nn.gelu(e @ params["w1"] + params["b1"])


def loss_fn(
    params: Params,
    contexts: jax.Array,
    targets: jax.Array,
    cfg: LMConfig,
    *,
    reduction: str = "mean",
    token_block: int | None = None,
) -> jax.Array:
    """Next-token cross-entropy through the fused head (padding labels ``-1`` ignored)."""
    return linear_softmax_cross_entropy(
        features(params, contexts),
        params["head_w"],
        targets,
        params["head_b"],
        reduction=reduction,
        ignore_index=_PAD_LABEL,
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
        token_block=token_block,
    )


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over the first ``num_devices`` local devices."""
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ValueError(
            f"asked for {n} devices but JAX sees {len(devices)} ({jax.default_backend()});"
            " on CPU, --devices sets the host device count before JAX starts"
        )
    return Mesh(np.array(devices[:n]), ("data",))


def _head_token_block(cfg: LMConfig, mesh: Mesh) -> int:
    # The fused loss's automatic block is sized for one device. Under the SPMD partitioner a
    # block of rows is split over the data axis, so give each device its own full block.
    rows = max(8, _HEAD_BLOCK_ELEMENTS // cfg.vocab_size // 8 * 8)
    return rows * mesh.size


def make_train_step(
    cfg: LMConfig, mesh: Mesh, optimizer: optax.GradientTransformation
) -> Callable[..., tuple[Params, Any, jax.Array]]:
    """A jitted ``step(params, opt_state, contexts, targets) -> (params, opt_state, loss)``:
    batches sharded along ``"data"``, parameters and optimizer state replicated."""
    rep = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P("data"))
    token_block = _head_token_block(cfg, mesh)

    def step(params, opt_state, contexts, targets):
        loss, grads = jax.value_and_grad(loss_fn)(
            params, contexts, targets, cfg, token_block=token_block
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(
        step,
        in_shardings=(rep, rep, data, data),
        out_shardings=rep,
        donate_argnums=(0, 1),
    )


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
            targets = np.pad(targets, (0, pad), constant_values=_PAD_LABEL)
        total += float(eval_sum(params, contexts, targets))
    mean = total / len(positions)
    return {"loss": mean, "perplexity": math.exp(mean), "positions": int(len(positions))}


@dataclass
class TrainResult:
    params: Params
    history: list[dict[str, float]]  # per step: step, train_loss
    evals: list[dict[str, float]]  # per evaluation: step, heldout_loss, heldout_perplexity
    final: dict[str, float]
    seconds: float
    config: LMConfig
    devices: int

    def summary(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "devices": self.devices,
            "seconds": self.seconds,
            "final_heldout": self.final,
            "history": self.history,
            "evals": self.evals,
        }


def train(
    cfg: LMConfig,
    corpus: Corpus,
    mesh: Mesh,
    *,
    progress: bool = False,
    log: Callable[[str], object] = print,
) -> TrainResult:
    """Trains with Adam on random windows of the training text; evaluates on held-out text
    every ``eval_every`` steps and at the end."""
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
    rng = np.random.default_rng(cfg.seed)
    optimizer = optax.adam(cfg.learning_rate)
    rep = NamedSharding(mesh, P())
    params = jax.device_put(init_params(jax.random.key(cfg.seed), cfg), rep)
    opt_state = jax.device_put(optimizer.init(params), rep)
    step_fn = make_train_step(cfg, mesh, optimizer)
    eval_sum = _make_eval_sum(cfg, mesh)

    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []

    def run_eval(step: int) -> None:
        m = evaluate(params, corpus.heldout, cfg, mesh, cfg.eval_positions, eval_sum)
        evals.append(
            {"step": step, "heldout_loss": m["loss"], "heldout_perplexity": m["perplexity"]}
        )

    steps: Iterable[int] = range(1, cfg.steps + 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc="train", unit="step", dynamic_ncols=True)
        steps = bar
    start = time.perf_counter()
    run_eval(0)
    for step in steps:
        positions = rng.integers(cfg.context, len(corpus.train), size=cfg.batch_size)
        contexts, targets = windows(corpus.train, positions, cfg.context)
        params, opt_state, loss = step_fn(params, opt_state, contexts, targets)
        history.append({"step": step, "train_loss": float(loss)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            run_eval(step)
        if bar is not None:
            bar.set_postfix(
                loss=f"{history[-1]['train_loss']:.3f}",
                heldout_ppl=f"{evals[-1]['heldout_perplexity']:.1f}",
            )
    if bar is not None:
        bar.close()
    final = evaluate(params, corpus.heldout, cfg, mesh, cfg.final_eval_positions, eval_sum)
    seconds = time.perf_counter() - start
    log(
        f"held-out perplexity {final['perplexity']:.2f} (loss {final['loss']:.4f} nats) on"
        f" {final['positions']} positions after {cfg.steps} steps, {seconds:.1f} s"
    )
    return TrainResult(params, history, evals, final, seconds, cfg, mesh.size)


def plot_losses(result: TrainResult, path: str | Path, title: str = "") -> None:
    """Training loss per step (raw and smoothed) and held-out loss, in nats, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = [h["step"] for h in result.history]
    losses = np.array([h["train_loss"] for h in result.history])
    if len(losses):
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        width = max(1, min(25, len(losses) // 10))
        if width > 1:
            smooth = np.convolve(losses, np.ones(width) / width, mode="valid")
            centre = np.asarray(steps[width // 2 : width // 2 + len(smooth)])
            ax.plot(centre, smooth, color="tab:blue", lw=1.5,
                    label=f"train ({width}-step moving average)")
    ax.plot(
        [e["step"] for e in result.evals],
        [e["heldout_loss"] for e in result.evals],
        "o-",
        color="tab:orange",
        ms=3,
        label="held-out",
    )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ppl = result.final["perplexity"]
    ax.set_title(title or f"stdlib next-token model, held-out perplexity {ppl:.1f}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
