"""The settings of one code-search run, checked once so the rest can trust them."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.checks import positive_ints, positive_number

__all__ = ["LOSSES", "RetrievalConfig"]

#: ``clip``: :func:`softmax_jax.contrastive_loss`; ``siglip``:
#: :func:`softmax_jax.sigmoid_contrastive_loss`.
LOSSES = ("clip", "siglip")


@dataclass(frozen=True)
class RetrievalConfig:
    """Hyper-parameters of one run (the flags of ``scripts/train_retrieval.py``).

    ``devices`` None trains on one device without ``shard_map``; a number shards every batch
    over that many local devices, the loss running its ring along the ``"data"`` axis.
    """

    loss: str = "clip"
    batch_size: int = 256
    steps: int = 500
    learning_rate: float = 2e-3
    embed_dim: int = 64
    hidden: int = 128
    eval_every: int = 50
    seed: int = 0
    devices: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        positive_ints(self, ("batch_size", "steps", "embed_dim", "hidden", "eval_every"))
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (a pair and a negative),"
                             f" got {self.batch_size}")
        positive_number("learning_rate", self.learning_rate)
        if self.devices is not None and self.devices < 1:
            raise ValueError(f"devices must be positive, got {self.devices}")
