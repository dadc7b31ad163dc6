r"""A multilayer perceptron trained with optax, in functional JAX (the notes' ``network2.py``).

The network is Nielsen's: sigmoid hidden layers, a linear read-out :math:`z` and one of three
output costs, all from :mod:`softmax_jax` (``y`` is the one-hot target):

* ``softmax_ce``: softmax output and log-likelihood,
  :func:`~softmax_jax.softmax_cross_entropy_with_integer_labels`;
  :math:`\partial C/\partial z = a - y`.
* ``sigmoid_ce``: sigmoid outputs, :func:`~softmax_jax.sigmoid_binary_cross_entropy` summed
  over the classes; :math:`\partial C/\partial z = a - y`.
* ``quadratic``: sigmoid outputs, :func:`~softmax_jax.quadratic_cost`;
  :math:`\partial C/\partial z = (a - y)\,\sigma'(z)`.

The gradients are the point of the experiment: only the quadratic cost multiplies the error
by :math:`\sigma'(z)`, which is tiny for a saturated, badly wrong output unit, so that cost
learns slowly exactly when it is most wrong.

Training is plain minibatch optimisation:

* The loss of a batch is the mean of its per-example costs plus Nielsen's L2 term
  :math:`\frac{\lambda}{2n}\sum w^2` over the weights (not the biases), with :math:`n` the
  training-set size. The penalty is part of the loss, so with ``adam`` it is L2
  regularisation, not decoupled weight decay.
* Each epoch visits every training example once in a fresh random order. The last,
  incomplete batch is padded to full size and its padding weighted 0, so every step has the
  same shape (one compilation) and no example is dropped.
* Randomness is explicit and seeded: the initial weights come from ``jax.random.key(seed)``
  and the epoch orders from a numpy ``Generator`` seeded with the same seed. Shuffling runs
  on the host because a ``jax.random.permutation`` program takes most of a second to
  compile on a small CPU, longer than a whole digits epoch; the generator's state goes into
  the checkpoint, so a resumed run draws exactly the orders an uninterrupted one would and
  ends bit-for-bit identical.
* After every epoch the full training loss and both accuracies are measured and, with an
  output directory, ``metrics.json`` and ``checkpoint.npz`` are rewritten atomically.

The package has one module per idea, in the order ``network2.py`` introduces them:

* :mod:`.config`: :class:`TrainConfig`, the hyper-parameters;
* :mod:`.model`: :func:`init_params` and :func:`forward` (``Network.__init__``,
  ``feedforward``);
* :mod:`.costs`: :func:`per_example_cost` and :func:`l2_penalty` (``QuadraticCost``,
  ``CrossEntropyCost``);
* :mod:`.step`: the jit-compiled :func:`make_train_step` and :func:`make_evaluate`
  (``update_mini_batch`` with ``backprop``; ``accuracy`` and ``total_cost``);
* :mod:`.state`: :class:`TrainState` and :func:`init_state`;
* :mod:`.loop`: :func:`train` and :func:`run_compare` (``SGD``);
* :mod:`.storage`: :func:`save_state` and :func:`restore_state` (``save`` and ``load``);
* :mod:`.report`: :func:`metrics_record`, :func:`history_array`, :func:`format_summary`.

Everything is re-exported here, so ``from experiments import mlp`` is all a caller
needs.
"""

from __future__ import annotations

from experiments.mlp.config import COSTS, OPTIMIZERS, TrainConfig
from experiments.mlp.costs import l2_penalty, per_example_cost
from experiments.mlp.loop import (
    DIVERGENCE_FACTOR,
    DivergenceError,
    run_compare,
    train,
)
from experiments.mlp.model import Params, forward, init_params
from experiments.mlp.report import format_summary, history_array, metrics_record
from experiments.mlp.state import TrainState, init_state
from experiments.mlp.step import (
    EvalFn,
    StepFn,
    make_evaluate,
    make_optimizer,
    make_train_step,
)
from experiments.mlp.storage import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    restore_state,
    save_state,
)

__all__ = [
    "CHECKPOINT_NAME",
    "COSTS",
    "DIVERGENCE_FACTOR",
    "METRICS_NAME",
    "OPTIMIZERS",
    "DivergenceError",
    "EvalFn",
    "Params",
    "StepFn",
    "TrainConfig",
    "TrainState",
    "forward",
    "format_summary",
    "history_array",
    "init_params",
    "init_state",
    "l2_penalty",
    "make_evaluate",
    "make_optimizer",
    "make_train_step",
    "metrics_record",
    "per_example_cost",
    "restore_state",
    "run_compare",
    "save_state",
    "train",
]
