"""The model of the next-token experiments: settings, parameters, features and the fused head.

Bengio et al.'s (2003) neural language model: the embeddings of the previous ``context``
tokens are concatenated, one GELU layer maps them to a ``hidden``-wide state, and
:func:`softmax_jax.fused.linear_softmax_cross_entropy` turns that state into the next-token
loss without materialising the ``batch x vocab`` logits. The distillation experiment uses
the same model for its teacher and its students, at different widths.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments.checks import positive_ints, positive_number
from softmax_jax.fused import BlockLayout, linear_softmax_cross_entropy

__all__ = [
    "PAD_LABEL",
    "LMConfig",
    "Params",
    "features",
    "init_params",
    "loss_fn",
    "make_mesh",
    "simulate_host_devices",
]

#: Label of padding positions in evaluation batches (skipped through ``ignore_index``).
PAD_LABEL = -1

Params = dict[str, jax.Array]


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
        if self.vocab_size < 2:
            # <unk> alone: every target is the same token, nothing to learn or measure.
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        positive_ints(self, ("context", "embed_dim", "hidden", "batch_size", "eval_every",
                             "eval_positions", "final_eval_positions"))
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        positive_number("learning_rate", self.learning_rate)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing}")
        if self.z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trajectory: all but the step count and the evaluation
        settings (evaluations draw no random numbers and change no parameters). A checkpoint
        resumes only under the same identity; ``steps`` may grow."""
        d = dataclasses.asdict(self)
        for name in ("steps", "eval_every", "eval_positions", "final_eval_positions"):
            del d[name]
        return d


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
        ignore_index=PAD_LABEL,
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
        token_block=token_block,
    )


def simulate_host_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices, for data parallelism on one machine.

    XLA reads the flag when JAX first starts a backend, so call this before any array is
    created or any device is listed; importing JAX earlier is fine.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(
        f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")
    )
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


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


def _head_token_block(cfg: LMConfig, mesh: Mesh, heads: int = 1) -> int:
    # The fused loss's automatic block (BlockLayout.default) is sized for one device. Under
    # the SPMD partitioner a block of rows is split over the data axis, so give each device
    # its own full block.
    # (n is only a clip here: the loss clips the block to the rows of each call.)
    layout = BlockLayout.default(2**30, cfg.hidden, cfg.vocab_size, heads=heads)
    return layout.token_block * mesh.size
