"""The task: reverse a prompt of ``length`` symbols. Its reward is a program's check.

Tokens ``0 .. symbols - 1`` are the symbols; token ``symbols`` is the padding that fills the
policy's context before the prompt, so the vocabulary has ``symbols + 1`` entries. A
completion of ``length`` tokens earns the fraction of its positions that hold the prompt's
symbol read backwards (1.0 for an exact reversal).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

__all__ = ["ReverseTask"]


@dataclass(frozen=True)
class ReverseTask:
    symbols: int = 31
    length: int = 4

    def __post_init__(self) -> None:
        if self.symbols < 2:
            raise ValueError(f"symbols must be at least 2, got {self.symbols}")
        if self.length < 1:
            raise ValueError(f"length must be positive, got {self.length}")

    @property
    def vocab_size(self) -> int:
        return self.symbols + 1

    @property
    def pad(self) -> int:
        return self.symbols

    def prompts(self, rng: np.random.Generator, n: int, heldout: bool = False) -> np.ndarray:
        """``[n, length]`` prompts of uniformly drawn symbols, from the training split or,
        with ``heldout``, from the held-out one (the prompts whose symbols add up to a
        multiple of 8, about 1 in 8), so that no held-out prompt is ever trained on."""
        out = np.zeros((0, self.length), np.int32)
        while len(out) < n:
            draw = rng.integers(0, self.symbols, (2 * n, self.length), dtype=np.int32)
            out = np.concatenate([out, draw[self.is_heldout(draw) == heldout]])
        return out[:n]

    @staticmethod
    def is_heldout(prompts: np.ndarray) -> np.ndarray:
        return np.sum(prompts, axis=1) % 8 == 0

    def answers(self, prompts: jnp.ndarray) -> jnp.ndarray:
        """The correct completions: each prompt reversed."""
        return prompts[:, ::-1]

    def reward(self, prompts: jnp.ndarray, completions: jnp.ndarray) -> jnp.ndarray:
        """``[n]`` fraction of the completion's positions that are right."""
        return jnp.mean((completions == self.answers(prompts)).astype(jnp.float32), axis=1)

    def contexts(self, prompts: jnp.ndarray, completions: jnp.ndarray,
                 context: int) -> jnp.ndarray:
        """``[n, length, context]``: the ``context`` tokens before each completion position
        (padding, the prompt, the completion so far)."""
        n = prompts.shape[0]
        seq = jnp.concatenate([jnp.full((n, context), self.pad, prompts.dtype), prompts,
                               completions.astype(prompts.dtype)], axis=1)
        start = self.length  # completion token t sits at context + length + t
        return jnp.stack([seq[:, start + t: start + t + context]
                          for t in range(self.length)], axis=1)
