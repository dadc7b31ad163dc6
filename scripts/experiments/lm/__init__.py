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
* **Checkpoints.** Parameters, Adam's state and the batch generator, written atomically at
  every evaluation; a resumed run ends bit-for-bit where an uninterrupted one would.

The code is a package with one module per part, shared by ``scripts/train_lm.py`` and
``scripts/distill_lm.py``: :mod:`.corpus` (text and tokens), :mod:`.model` (the model and
its fused head), :mod:`.loop` (the training loop and evaluation), :mod:`.checkpoint`,
:mod:`.plot` and :mod:`.distill` (the teacher and students of ``distill_lm.py``). This
module gathers the public names of the first five, so ``from experiments import
lm`` is all a caller needs.
"""

from __future__ import annotations

from experiments.lm.checkpoint import (
    CHECKPOINT_NAME,
    TrainState,
    load_params,
    restore_state,
    save_state,
    saved_step,
)
from experiments.lm.corpus import (
    TOKEN_RE,
    UNK,
    Corpus,
    CorpusError,
    build_vocab,
    load_corpus,
    stdlib_files,
    tokenize,
    unigram_perplexity,
    windows,
)
from experiments.lm.loop import (
    Objective,
    TrainResult,
    evaluate,
    make_train_step,
    train,
)
from experiments.lm.model import (
    PAD_LABEL,
    LMConfig,
    Params,
    features,
    init_params,
    loss_fn,
    make_mesh,
    simulate_host_devices,
)
from experiments.lm.plot import plot_distillation, plot_losses

__all__ = [
    "CHECKPOINT_NAME",
    "PAD_LABEL",
    "TOKEN_RE",
    "UNK",
    "Corpus",
    "CorpusError",
    "LMConfig",
    "Objective",
    "Params",
    "TrainResult",
    "TrainState",
    "build_vocab",
    "evaluate",
    "features",
    "init_params",
    "load_corpus",
    "load_params",
    "loss_fn",
    "make_mesh",
    "make_train_step",
    "plot_distillation",
    "plot_losses",
    "restore_state",
    "save_state",
    "saved_step",
    "simulate_host_devices",
    "stdlib_files",
    "tokenize",
    "train",
    "unigram_perplexity",
    "windows",
]
