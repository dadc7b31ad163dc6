r"""The notes' worked example: softmax of ``[2, 3, 4]`` and the cross-entropy gradient.

With logits :math:`z = (2, 3, 4)` the softmax is :math:`a = (0.0900, 0.2447, 0.6652)`. If the
true class is the second one, :math:`y = (0, 1, 0)`, the log-likelihood cost is
:math:`C = -\ln a_2 = 1.4076` and its gradient with respect to the logits is simply
:math:`a - y = (0.0900, -0.7553, 0.6652)`: the output's error, with no :math:`\sigma'`
factor to slow learning down.

Both the softmax and the gradient are computed by the library (the gradient by ``jax.grad``
through :func:`softmax_jax.softmax_cross_entropy_with_integer_labels`), then checked against
:math:`a - y`.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import softmax_jax as sj

__all__ = ["WorkedExample", "compute", "report"]


@dataclass(frozen=True)
class WorkedExample:
    """The example's numbers (numpy, float32)."""

    logits: np.ndarray
    label: int
    probs: np.ndarray
    loss: float
    grad: np.ndarray


def compute(logits: tuple[float, ...] = (2.0, 3.0, 4.0), label: int = 1) -> WorkedExample:
    """Softmax, cross-entropy and its gradient for one example with class index ``label``."""
    z = jnp.asarray(logits, jnp.float32)
    if not 0 <= label < z.shape[0]:
        raise ValueError(f"label must be a class index in [0, {z.shape[0]}), got {label}")
    y = jnp.asarray(label)

    def cost(z: jax.Array) -> jax.Array:
        return sj.softmax_cross_entropy_with_integer_labels(z, y)

    loss, grad = jax.value_and_grad(cost)(z)
    return WorkedExample(
        logits=np.asarray(z),
        label=label,
        probs=np.asarray(sj.softmax(z)),
        loss=float(loss),
        grad=np.asarray(grad),
    )


def _fmt(values: np.ndarray) -> str:
    return " ".join(f"{v:.4f}" for v in values)


def report(example: WorkedExample | None = None) -> str:
    """The example as the lines ``worked_example.py`` prints (four decimals)."""
    ex = example or compute()
    one_hot = np.eye(ex.logits.shape[0], dtype=np.float32)[ex.label]
    # The library's gradient must be the textbook a - y; say so loudly if it ever is not.
    check = "matches a - y" if np.allclose(ex.grad, ex.probs - one_hot, atol=1e-6) else "DIFFERS"
    ordinal = {0: "first", 1: "second", 2: "third"}.get(ex.label, f"#{ex.label + 1}")
    y = ", ".join(str(int(v)) for v in one_hot)
    return "\n".join(
        [
            f"logits z          : {_fmt(ex.logits)}",
            f"softmax a         : {_fmt(ex.probs)}",
            f"true class        : {ex.label} (the {ordinal}), y = ({y})",
            f"cost C = -ln a_y  : {ex.loss:.4f}",
            f"gradient dC/dz    : {_fmt(ex.grad)}   ({check})",
        ]
    )
