"""The hyper-parameters of one training run, checked once so the rest can trust them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from experiments.checks import positive_number

__all__ = ["COSTS", "OPTIMIZERS", "TrainConfig"]

#: The output costs, in the order ``--compare`` trains and plots them.
COSTS = ("softmax_ce", "sigmoid_ce", "quadratic")
OPTIMIZERS = ("sgd", "adam")


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
        positive_number("eta", self.eta)
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
