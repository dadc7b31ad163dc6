"""Checkpoints of the next-token experiments: the training state, saved and restored.

A checkpoint holds everything the next step depends on: the parameters, Adam's state and the
numpy generator that draws the batch positions, so a run resumed from step ``k`` draws the
same batches and ends with bit-for-bit the parameters of an uninterrupted run. It also holds
the full configuration and a fingerprint of the corpus: resuming checks both (a different
model or encoding is an error, not a silently wrong state), and ``distill_lm.py`` reads a
teacher's widths from it. Files are written atomically by
:mod:`experiments.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from experiments.lm.corpus import Corpus
from experiments.lm.model import LMConfig, Params, init_params

__all__ = [
    "CHECKPOINT_NAME",
    "TrainState",
    "fresh_state",
    "load_params",
    "restore_state",
    "save_state",
    "saved_step",
]

CHECKPOINT_NAME = "checkpoint.npz"
_FORMAT = "softmax_jax.lm/1"


@dataclass
class TrainState:
    """Everything the next step depends on, plus the record so far."""

    params: Params
    opt_state: Any
    rng: np.random.Generator  # draws the batch positions
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def fresh_state(cfg: LMConfig, optimizer: optax.GradientTransformation) -> TrainState:
    """Step 0: parameters from ``key(seed)``, and the batch generator seeded with ``seed``."""
    params = init_params(jax.random.key(cfg.seed), cfg)
    return TrainState(params, optimizer.init(params), np.random.default_rng(cfg.seed))


def _tree(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state}


def save_state(path: str | Path, state: TrainState, cfg: LMConfig, corpus: Corpus) -> None:
    """Writes ``state`` to ``path`` atomically, with the configuration and the corpus
    fingerprint it belongs to."""
    meta = {
        "format": _FORMAT,
        "step": state.step,
        "config": dataclasses.asdict(cfg),
        "corpus": corpus.fingerprint(),
        "history": state.history,
        "evals": state.evals,
        "rng_state": state.rng.bit_generator.state,  # PCG64's state: a dict of (big) ints
    }
    save_checkpoint(path, _tree(state), meta)


def _read_meta(path: Path) -> dict[str, Any]:
    """The metadata alone, to learn a checkpoint's configuration before building a template."""
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"][()]))
    except Exception as exc:  # any unreadable file is the same error to the user
        raise CheckpointError(path, f"not a readable checkpoint ({type(exc).__name__})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(path, "not a checkpoint of train_lm.py")
    return meta


def _check_corpus(path: Path, meta: dict[str, Any], corpus: Corpus) -> None:
    if meta.get("corpus") != corpus.fingerprint():
        raise CheckpointError(
            path,
            "written for another corpus (vocabulary, files or held-out split differ: use the"
            " --vocab, --max-files and --heldout-every it was trained with)",
        )


def restore_state(
    path: str | Path, cfg: LMConfig, corpus: Corpus, optimizer: optax.GradientTransformation
) -> TrainState:
    """Loads a checkpoint of a run with ``cfg``'s identity on ``corpus``.

    Raises:
      CheckpointError: unreadable, or written by a run with other settings (besides the
        step count and evaluation settings) or on another corpus.
    """
    path = Path(path)
    meta = _read_meta(path)
    _check_corpus(path, meta, corpus)
    try:
        saved = LMConfig(**meta["config"]).identity()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"incomplete checkpoint metadata ({exc!r})") from exc
    wanted = cfg.identity()
    if saved != wanted:
        diffs = ", ".join(
            f"{k} {saved[k]!r} (now {wanted[k]!r})" for k in wanted if saved[k] != wanted[k]
        )
        raise CheckpointError(path, f"written by a different run: {diffs}; drop --resume")
    tree, _ = load_checkpoint(path, _tree(fresh_state(cfg, optimizer)))
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = meta["rng_state"]
        return TrainState(tree["params"], tree["opt_state"], rng, int(meta["step"]),
                          list(meta["history"]), list(meta["evals"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"incomplete checkpoint metadata ({exc!r})") from exc


def load_params(path: str | Path, corpus: Corpus) -> tuple[Params, LMConfig, int]:
    """``(params, config, step)`` of any train_lm checkpoint on ``corpus``, whatever its
    widths: the configuration is read from the file (how ``distill_lm.py`` loads a teacher).
    """
    path = Path(path)
    meta = _read_meta(path)
    _check_corpus(path, meta, corpus)
    try:
        cfg = LMConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"incomplete checkpoint metadata ({exc!r})") from exc
    tree, _ = load_checkpoint(path, _tree(fresh_state(cfg, optax.adam(cfg.learning_rate))))
    return tree["params"], cfg, int(meta["step"])


def saved_step(path: str | Path) -> int | None:
    """The step of the checkpoint at ``path``, or ``None`` when there is no readable one
    (what an interrupted script reports as saved)."""
    try:
        return int(_read_meta(Path(path))["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return None
