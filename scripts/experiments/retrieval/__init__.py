r"""Two-tower code search on the standard library, trained through the contrastive losses.

A real user of :func:`softmax_jax.contrastive_loss` (CLIP) and
:func:`softmax_jax.sigmoid_contrastive_loss` (SigLIP): given a docstring, find its function
among all the held-out functions.

* **Data** (:mod:`.data`): the (docstring summary, function code) pairs that :mod:`ast` finds
  in the interpreter's own standard library (nothing to download), split by file into
  training and held-out sets, as sub-word tokens.
* **Model** (:mod:`.model`, :mod:`.config`): two towers of token embeddings, mean pooling, a
  small MLP and L2 normalisation, and a learned logit scale (and bias for SigLIP).
* **Loop** (:mod:`.loop`): Adam over random batches of distinct pairs, on one device or
  sharded over several with :func:`jax.shard_map`, where the loss runs its ring.
* **Metrics** (:mod:`.metrics`, :mod:`.report`): held-out recall@k against the chance value
  over the same pool, the mean reciprocal rank, ``metrics.json`` and a figure.

``scripts/train_retrieval.py`` is the command line over these names.
"""

from __future__ import annotations

from experiments.retrieval.config import LOSSES, RetrievalConfig
from experiments.retrieval.data import (
    Encoded,
    Pair,
    PairSplit,
    check_data_settings,
    encode,
    extract_pairs,
    load_pairs,
    subword_tokens,
)
from experiments.retrieval.loop import (
    Batch,
    RunResult,
    batches,
    evaluate,
    make_mesh,
    make_train_step,
    take_batch,
    train,
)
from experiments.retrieval.metrics import (
    random_recall_at_k,
    ranks,
    retrieval_metrics,
)
from experiments.retrieval.model import (
    Params,
    batch_loss,
    embed,
    init_params,
    logit_params,
)
from experiments.retrieval.report import (
    FIGURE_NAME,
    METRICS_NAME,
    metrics_record,
    plot_run,
    write_outputs,
)

__all__ = [
    "FIGURE_NAME",
    "LOSSES",
    "METRICS_NAME",
    "Batch",
    "Encoded",
    "Pair",
    "PairSplit",
    "Params",
    "RetrievalConfig",
    "RunResult",
    "batch_loss",
    "batches",
    "check_data_settings",
    "embed",
    "encode",
    "evaluate",
    "extract_pairs",
    "init_params",
    "load_pairs",
    "logit_params",
    "make_mesh",
    "make_train_step",
    "metrics_record",
    "plot_run",
    "random_recall_at_k",
    "ranks",
    "retrieval_metrics",
    "subword_tokens",
    "take_batch",
    "train",
    "write_outputs",
]
