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
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softmax_jax as sj
from softmax_jax.experiments.checkpoint import (
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
)
from softmax_jax.experiments.data import Dataset

__all__ = [
    "COSTS",
    "OPTIMIZERS",
    "Params",
    "TrainConfig",
    "TrainState",
    "forward",
    "init_params",
    "init_state",
    "make_optimizer",
    "make_evaluate",
    "make_train_step",
    "per_example_cost",
    "train",
]

#: The output costs, in the order ``--compare`` trains and plots them.
COSTS = ("softmax_ce", "sigmoid_ce", "quadratic")
OPTIMIZERS = ("sgd", "adam")

#: Network parameters: one ``{"w": [n_in, n_out], "b": [n_out]}`` dict per layer.
Params = list[dict[str, jax.Array]]

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"
# Evaluation runs over the data in chunks of at most this many examples, to bound the
# activation memory on MNIST-sized sets with wide layers.
_EVAL_CHUNK = 10_000


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (the command-line flags of ``train.py``)."""

    cost: str = "softmax_ce"
    hidden: tuple[int, ...] = (30,)
    epochs: int = 30
    batch_size: int = 10
    eta: float = 0.5
    optimizer: str = "sgd"
    l2: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Normalise types so that equal settings compare (and hash, and round-trip through
        # the checkpoint's JSON) equal: hidden=[30] and (30,), eta=1 and 1.0.
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "l2", float(self.l2))
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {self.cost!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}"
            )
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be positive, got {list(self.hidden)}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise ValueError(f"eta must be a positive number, got {self.eta}")
        if not (self.l2 >= 0 and math.isfinite(self.l2)):
            raise ValueError(f"l2 must be >= 0, got {self.l2}")

    def identity(self) -> dict[str, Any]:
        """Everything that defines the trajectory: all fields except ``epochs``.

        A checkpoint can only be resumed under the same identity; ``epochs`` may grow.
        """
        d = dataclasses.asdict(self)
        del d["epochs"]
        d["hidden"] = list(self.hidden)
        return d


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
    """

    params: Params
    opt_state: optax.OptState
    rng: np.random.Generator
    epoch: int = 0
    history: dict[str, list[float]] = field(
        default_factory=lambda: {
            "train_loss": [],
            "train_accuracy": [],
            "test_accuracy": [],
            "epoch_seconds": [],
        }
    )


# --------------------------------------------------------------------------------------------
# Model and costs
# --------------------------------------------------------------------------------------------


def init_params(key: jax.Array, sizes: tuple[int, ...] | list[int]) -> Params:
    r"""Nielsen's default initialisation: :math:`w \sim \mathcal N(0, 1/n_{in})`,
    :math:`b \sim \mathcal N(0, 1)`.

    Scaling the weights by :math:`1/\sqrt{n_{in}}` keeps each hidden :math:`z` of order 1, so
    the sigmoid units start out unsaturated (the weight-initialisation section of the notes).

    All values come from one normal draw carved into the layers: each ``jax.random.normal``
    call of a new shape compiles its own threefry program (most of a second on a small CPU),
    so one draw keeps start-up fast.

    Args:
      key: a PRNG key.
      sizes: layer widths from input to output, e.g. ``(64, 30, 10)``.
    """
    layers = list(zip(sizes[:-1], sizes[1:], strict=True))
    total = sum(n_in * n_out + n_out for n_in, n_out in layers)
    flat = jax.random.normal(key, (total,), jnp.float32)
    params: Params = []
    offset = 0
    for n_in, n_out in layers:
        w = flat[offset : offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        b = flat[offset : offset + n_out]
        offset += n_out
        params.append({"w": w / jnp.sqrt(jnp.float32(n_in)), "b": b})
    return params


def forward(params: Params, x: jax.Array) -> jax.Array:
    """The output layer's weighted input ``z`` (logits) for a batch ``x [n, features]``.

    Hidden layers use :func:`softmax_jax.sigmoid`; the output activation belongs to the cost.
    """
    h = x
    for layer in params[:-1]:
        h = sj.sigmoid(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def per_example_cost(cost: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cost of output-layer ``logits [n, classes]`` against integer ``labels [n]``.

    See the module docstring for the three costs and their gradients.
    """
    if cost == "softmax_ce":
        return sj.softmax_cross_entropy_with_integer_labels(logits, labels)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if cost == "sigmoid_ce":
        return jnp.sum(sj.sigmoid_binary_cross_entropy(logits, one_hot), axis=-1)
    if cost == "quadratic":
        return sj.quadratic_cost(sj.sigmoid(logits), one_hot)
    raise ValueError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")


def l2_penalty(params: Params, l2: float, n_train: int) -> jax.Array:
    r"""Nielsen's :math:`\frac{\lambda}{2n}\sum w^2`, over the weights only (biases are free)."""
    if l2 == 0:
        return jnp.zeros((), jnp.float32)  # keep the squares out of the compiled step
    total = sum(jnp.sum(jnp.square(layer["w"])) for layer in params)
    return (0.5 * l2 / n_train) * jnp.asarray(total)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.sgd`` (plain gradient descent, as in the notes) or ``optax.adam``."""
    if config.optimizer == "sgd":
        return optax.sgd(config.eta)
    return optax.adam(config.eta)


def _program_key(config: TrainConfig) -> TrainConfig:
    """``config`` without the fields that never change a compiled program.

    The compiled step, evaluation and initialisation are cached under this key, so that
    repeated or resumed runs in one process (tests, ``--compare`` re-runs) compile once.
    Layer sizes need not be in it: ``jax.jit`` specialises on argument shapes by itself.
    """
    return dataclasses.replace(config, epochs=0, seed=0, hidden=())


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
    init = _compiled_init(_program_key(config), (num_features, *config.hidden, num_classes))
    params, opt_state = init(jax.random.key(config.seed))
    return TrainState(params=params, opt_state=opt_state, rng=np.random.default_rng(config.seed))


# --------------------------------------------------------------------------------------------
# Compiled step and evaluation
# --------------------------------------------------------------------------------------------

StepFn = Callable[
    [Params, optax.OptState, jax.Array, jax.Array, jax.Array, int],
    tuple[Params, optax.OptState],
]


def make_train_step(config: TrainConfig, n_train: int) -> StepFn:
    """A jit-compiled step ``(params, opt_state, x, y, order, i) -> (params, opt_state)``.

    The step trains on batch ``i`` of the epoch, i.e. the examples
    ``order[i * batch : (i + 1) * batch]``. The whole training set stays on the device and
    only the index ``i`` crosses from Python, so a step costs one dispatch and no copy.
    ``order`` is the epoch's permutation padded to a whole number of batches; positions at or
    past ``n_train`` are padding and get weight 0.

    Compiled functions are cached per hyper-parameters (see :func:`_program_key`).
    """
    return _compiled_step(_program_key(config), n_train)


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


EvalFn = Callable[[Params, tuple[tuple[jax.Array, jax.Array], ...]], list[tuple[float, float]]]


def make_evaluate(config: TrainConfig, n_train: int) -> EvalFn:
    """A function ``(params, ((x, y), ...)) -> [(accuracy, loss), ...]``, one pair per set.

    The loss is the training objective: the mean cost plus the L2 term (scaled by the
    training-set size ``n_train``, as in training). The prediction is the largest output,
    which is the same unit for the softmax and the sigmoid outputs.

    All sets are scored by one compiled program (one compilation instead of one per set,
    which matters at start-up), in chunks of at most 10,000 examples so that activation
    memory stays bounded on MNIST-sized sets with wide layers.
    """
    return _compiled_evaluate(_program_key(config), n_train)


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


# --------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------


def _epoch_order(rng: np.random.Generator, n: int, padded: int) -> jax.Array:
    """The next epoch's shuffled example order, padded with index 0 to ``padded`` entries."""
    order = np.zeros(padded, dtype=np.int32)
    order[:n] = rng.permutation(n)
    return jnp.asarray(order)


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state}


def metrics_record(config: TrainConfig, dataset: Dataset, state: TrainState) -> dict[str, Any]:
    """The contents of ``metrics.json``: configuration, dataset and per-epoch metrics."""
    return {
        "cost": config.cost,
        "dataset": dataset.name,
        "config": dataclasses.asdict(config) | {"hidden": list(config.hidden)},
        "epochs_completed": state.epoch,
        **state.history,
    }


def save_state(
    out_dir: Path, config: TrainConfig, dataset: Dataset, state: TrainState
) -> None:
    """Rewrites ``checkpoint.npz`` and ``metrics.json`` in ``out_dir`` (each atomically).

    The checkpoint is written first: if the process dies in between, ``metrics.json`` lags
    by an epoch but the checkpoint (and so ``--resume``) is never behind the metrics.
    """
    meta = {
        "format": 1,
        "epoch": state.epoch,
        "dataset": dataset.name,
        "identity": config.identity(),
        "history": state.history,
        # PCG64's state: a JSON object of (big) ints.
        "rng_state": state.rng.bit_generator.state,
    }
    save_checkpoint(out_dir / CHECKPOINT_NAME, _checkpoint_tree(state), meta)
    atomic_write_json(out_dir / METRICS_NAME, metrics_record(config, dataset, state))


def restore_state(path: Path, config: TrainConfig, dataset: Dataset) -> TrainState:
    """Loads a checkpoint and checks that it belongs to this configuration and dataset.

    Raises:
      CheckpointError: the file is unreadable, or was written by a run with different
        hyper-parameters (other than ``epochs``), another seed or another dataset.
    """
    template = init_state(config, dataset.num_features, dataset.num_classes)
    tree, meta = load_checkpoint(path, _checkpoint_tree(template))
    if meta.get("dataset") != dataset.name:
        raise CheckpointError(
            path, f"written for dataset {meta.get('dataset')!r}, not {dataset.name!r}"
        )
    saved = meta.get("identity", {})
    wanted = config.identity()
    if saved != wanted:
        diffs = ", ".join(
            f"{k} {saved.get(k)!r} (now {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k]
        )
        raise CheckpointError(path, f"written by a different run: {diffs}; drop --resume")
    try:
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng_state"]
        epoch = int(meta["epoch"])
        history = {k: [float(v) for v in meta["history"][k]] for k in template.history}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"incomplete checkpoint metadata ({exc!r})") from exc
    return TrainState(
        params=jax.tree_util.tree_map(jnp.asarray, tree["params"]),
        opt_state=jax.tree_util.tree_map(jnp.asarray, tree["opt_state"]),
        rng=rng,
        epoch=epoch,
        history=history,
    )


def train(
    config: TrainConfig,
    dataset: Dataset,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> TrainState:
    """Trains an MLP on ``dataset`` for ``config.epochs`` epochs and returns the final state.

    Args:
      config: hyper-parameters.
      dataset: the data (see :mod:`softmax_jax.experiments.data`).
      out_dir: if given, ``metrics.json`` and ``checkpoint.npz`` are rewritten there after
        every epoch.
      resume: continue from ``out_dir/checkpoint.npz`` when it exists (up to
        ``config.epochs``); when it does not, training starts from epoch 0.
      progress: show a per-epoch progress bar (``tqdm``) over the batches.
      log: called with one line per epoch (and one on resume); silent when ``None``.

    Raises:
      CheckpointError: ``resume`` found a checkpoint that is unreadable or from another run.
    """
    say = log or (lambda _line: None)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume needs an output directory holding the checkpoint")

    state: TrainState | None = None
    if resume and out is not None:
        path = out / CHECKPOINT_NAME
        if path.is_file():
            state = restore_state(path, config, dataset)
            say(f"resumed from {path} after epoch {state.epoch}")
            if state.epoch >= config.epochs:
                say(f"nothing to train: the checkpoint is at epoch {state.epoch}/{config.epochs}")
        else:
            say(f"no checkpoint at {path}; starting from epoch 0")
    if state is None:
        state = init_state(config, dataset.num_features, dataset.num_classes)

    n_train = int(dataset.x_train.shape[0])
    num_batches = -(-n_train // config.batch_size)
    padded = num_batches * config.batch_size
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    step = make_train_step(config, n_train)
    evaluate = make_evaluate(config, n_train)

    bar = None
    if progress:
        from tqdm.auto import tqdm  # optional extra, imported only when asked for

        bar = tqdm(total=num_batches, unit="batch", leave=False, dynamic_ncols=True)
    # Refreshing the bar on every one of thousands of tiny steps would cost more than the
    # steps; about 20 updates per epoch look just as smooth.
    bar_every = max(1, num_batches // 20)

    params, opt_state = state.params, state.opt_state
    try:
        for epoch in range(state.epoch, config.epochs):
            t0 = time.perf_counter()
            order = _epoch_order(state.rng, n_train, padded)
            if bar is not None:
                bar.reset()
                bar.set_description(f"epoch {epoch + 1}/{config.epochs}")
            for i in range(num_batches):
                params, opt_state = step(params, opt_state, x_train, y_train, order, i)
                if bar is not None and ((i + 1) % bar_every == 0 or i + 1 == num_batches):
                    bar.update((i + 1) - bar.n)
            (train_acc, train_loss), (test_acc, _) = evaluate(
                params, ((x_train, y_train), (x_test, y_test))
            )
            seconds = time.perf_counter() - t0

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
    if out is not None and state.epoch >= config.epochs and not state.history["train_loss"]:
        # Zero epochs asked for: still leave a metrics file behind for tools that expect one.
        atomic_write_json(out / METRICS_NAME, metrics_record(config, dataset, state))
    return state


def run_compare(
    config: TrainConfig,
    dataset: Dataset,
    out_dir: str | Path | None,
    *,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
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


def history_array(state: TrainState, key: str) -> np.ndarray:
    """One metric's per-epoch values as a numpy array (for plots and tests)."""
    return np.asarray(state.history[key], dtype=np.float64)


def format_summary(states: dict[str, TrainState]) -> str:
    """A table of runs by cost: test accuracy after epoch 1 and at the end, best, final loss.

    The first-epoch column is where the quadratic cost's slowdown shows.
    """
    head = (
        f"{'cost':<12}{'epochs':>7}{'acc@1':>9}{'final acc':>11}{'best acc':>10}"
        f"{'train loss':>12}"
    )
    lines = [head, "-" * len(head)]
    for cost, state in states.items():
        h = state.history
        if not h["test_accuracy"]:
            lines.append(f"{cost:<12}{state.epoch:>7}{'-':>9}{'-':>11}{'-':>10}{'-':>12}")
            continue
        lines.append(
            f"{cost:<12}{state.epoch:>7}{h['test_accuracy'][0]:>9.4f}"
            f"{h['test_accuracy'][-1]:>11.4f}{max(h['test_accuracy']):>10.4f}"
            f"{h['train_loss'][-1]:>12.4f}"
        )
    return "\n".join(lines)
