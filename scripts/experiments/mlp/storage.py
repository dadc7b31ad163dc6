"""Saving and resuming a run (``network2.Network.save`` and ``network2.load``).

``network2.py`` saves the weights, biases and cost name as JSON, enough to predict but not to
continue training. A checkpoint here also keeps the optimiser state, the shuffling
generator's state and the history, so a resumed run ends bit-for-bit where an uninterrupted
one would. The atomic file writing is :mod:`experiments.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.checkpoint import (
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
)
from experiments.data import Dataset
from experiments.mlp.config import TrainConfig
from experiments.mlp.report import metrics_record
from experiments.mlp.state import TrainState, init_state

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "restore_state", "save_state"]

CHECKPOINT_NAME = "checkpoint.npz"
METRICS_NAME = "metrics.json"


def _checkpoint_tree(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state}


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


def _check_owner(path: Path, meta: dict[str, Any], config: TrainConfig, dataset: Dataset) -> None:
    """Refuses a checkpoint written for another dataset or other hyper-parameters."""
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


def restore_state(path: Path, config: TrainConfig, dataset: Dataset) -> TrainState:
    """Loads a checkpoint and checks that it belongs to this configuration and dataset.

    Raises:
      CheckpointError: the file is unreadable, or was written by a run with different
        hyper-parameters (other than ``epochs``), another seed or another dataset.
    """
    template = init_state(config, dataset.num_features, dataset.num_classes)
    tree, meta = load_checkpoint(path, _checkpoint_tree(template))
    _check_owner(path, meta, config, dataset)
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
