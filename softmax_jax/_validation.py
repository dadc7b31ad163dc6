"""Argument checks shared by the public functions.

Every check runs at call time (trace time under ``jax.jit``), on static information only:
shapes, dtypes and concrete Python hyper-parameters. A failing check raises ``TypeError`` or
``ValueError`` whose message names the argument, so a user sees the mistake before any
computation and never gets a silently wrong number.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

Mask = jax.Array | None  # a checked ``where`` mask (True: kept); None keeps everything


def as_float_array(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """Returns ``x`` as a JAX array, raising ``TypeError`` unless it is floating point."""
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a floating-point array, got dtype {arr.dtype}"
            f" (shape {tuple(arr.shape)}); cast it with .astype(jnp.float32)"
        )
    return arr


def as_int_array(name: str, x: jax.typing.ArrayLike, hint: str = "") -> jax.Array:
    """Returns ``x`` as a JAX array, raising ``TypeError`` unless it holds integers."""
    arr = jnp.asarray(x)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be an integer array of class indices, got dtype {arr.dtype}"
            f" (shape {tuple(arr.shape)}){hint}"
        )
    return arr


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    """Raises ``ValueError`` unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {name_a}.shape="
            f"{tuple(a.shape)} and {name_b}.shape={tuple(b.shape)}"
        )


def as_float_pair(
    name_a: str, a: jax.typing.ArrayLike, name_b: str, b: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Both arguments as floating-point arrays of one shape (an element-wise loss's inputs)."""
    arr_a, arr_b = as_float_array(name_a, a), as_float_array(name_b, b)
    check_same_shape(name_a, arr_a, name_b, arr_b)
    return arr_a, arr_b


def broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` broadcasts to exactly ``target`` (without enlarging it)."""
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def as_binary_targets(logits: jax.Array, labels: jax.typing.ArrayLike) -> jax.Array:
    """Targets of an element-wise binary loss, as optax takes them: floating-point
    probabilities, or integer/boolean 0/1 labels (cast to ``logits``'s dtype), of
    ``logits``'s shape or a shape that broadcasts to it.

    Only ``labels`` may be broadcast: a result larger than ``logits`` (``(N, 1)`` logits with
    ``(N,)`` labels giving ``(N, N)``) raises ``ValueError`` instead of silently turning into
    an outer product.
    """
    arr = jnp.asarray(labels)
    if jnp.issubdtype(arr.dtype, jnp.bool_) or jnp.issubdtype(arr.dtype, jnp.integer):
        arr = arr.astype(logits.dtype)
    elif not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(
            f"labels must be floating-point probabilities or integer/boolean 0/1 labels,"
            f" got dtype {arr.dtype} (shape {tuple(arr.shape)})"
        )
    if not broadcasts_to(arr.shape, logits.shape):
        raise ValueError(
            f"labels.shape={tuple(arr.shape)} must equal or broadcast to"
            f" logits.shape={tuple(logits.shape)}"
        )
    return arr


def canonical_axis(axis: object, ndim: int, name: str = "x") -> int:
    """Returns ``axis`` as a non-negative int, checking its type and range."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
    axis = int(axis)
    if ndim == 0:
        raise ValueError(f"{name} must have at least one dimension to normalise over, got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis} is out of range for {name} with {ndim} dimension(s)")
    return axis % ndim


def check_where(
    where: jax.typing.ArrayLike, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array:
    """The ``where`` mask as a boolean array that broadcasts to ``shape`` (NumPy broadcasting
    only, as in ``jax.nn``), raising ``ValueError`` otherwise.

    When a mask of ``shape`` without the class ``axes`` does not broadcast, the message
    shows the per-row spelling, the mask with the class axes re-inserted as size 1. (The
    two cross-entropies read such a mask per example instead: :func:`loss_where`.)
    """
    mask = jnp.asarray(where)
    if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
        raise TypeError(f"where must be a boolean mask, got dtype {mask.dtype}")
    if not broadcasts_to(mask.shape, tuple(shape)):
        hint = ""
        row_shape = tuple(n for d, n in enumerate(shape) if d not in axes)
        if mask.shape == row_shape:
            index = ", ".join("None" if d in axes else ":" for d in range(len(shape)))
            hint = f"; for one flag per row pass where[{index}]"
        raise ValueError(
            f"where.shape={tuple(mask.shape)} must broadcast to the input shape"
            f" {tuple(shape)}{hint}"
        )
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _boolean(name: str, x: jax.typing.ArrayLike) -> jax.Array:
    """``x`` as an array, raising ``TypeError`` unless it is boolean (an integer mask is more
    often a list of indices than flags)."""
    mask = jnp.asarray(x)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {mask.dtype}"
                        f" (shape {tuple(mask.shape)}); for indices, build the mask first")
    return mask


def boolean_mask(name: str, x: jax.typing.ArrayLike, shape: tuple[int, ...]) -> jax.Array:
    """A per-row boolean mask of exactly ``shape`` (the contrastive pairs):
    ``TypeError`` for any other dtype, ``ValueError`` for another shape."""
    mask = _boolean(name, x)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} must be a boolean mask of shape {tuple(shape)} (one flag"
                         f" per row), got {name}.shape={tuple(mask.shape)}")
    return mask


def token_where(where: jax.typing.ArrayLike | None, lead: tuple[int, ...]) -> Mask:
    """The fused losses' ``where``, one flag per token: a boolean mask of ``x``'s leading
    shape ``lead`` or one that broadcasts to it (NumPy broadcasting, as optax's masks),
    returned broadcast and flattened to ``[prod(lead)]`` (None stays None). ``TypeError``
    for any other dtype, ``ValueError`` for a shape that does not broadcast to ``lead``."""
    if where is None:
        return None
    mask = _boolean("where", where)
    if not broadcasts_to(mask.shape, tuple(lead)):
        raise ValueError(f"where must be a boolean mask of shape {tuple(lead)} (x's leading"
                         f" shape, one flag per token) or one that broadcasts to it, got"
                         f" where.shape={tuple(mask.shape)}")
    return jnp.broadcast_to(mask, tuple(lead)).reshape(-1)


def where_like(where: jax.typing.ArrayLike | None, lead: tuple[int, ...]) -> object:
    """``where`` broadcast to ``lead`` where it is an array that broadcasts to it, as given
    otherwise (for laying it out like the tokens before :func:`token_where` checks it)."""
    if where is None or not broadcasts_to(jnp.shape(where), tuple(lead)):
        return where
    return jnp.broadcast_to(where, tuple(lead))


def loss_where(
    where: jax.typing.ArrayLike | None, shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array | None:
    """The ``where`` of the two softmax cross-entropies, read as optax reads it, with
    ``shape``'s rank: a mask of the logits' rank is per element (NumPy broadcasting); one of
    the labels' rank (the logits' without the class ``axes``) is one flag per example,
    ``expand_dims(where, axes)``, also when the logits are square. Any other rank raises
    ``ValueError``, since it could only be read by guessing."""
    if where is None:
        return None
    mask = jnp.asarray(where)
    batch = tuple(n for d, n in enumerate(shape) if d not in axes)
    if mask.ndim == len(shape):
        return check_where(mask, shape, axes)
    if mask.ndim == len(batch):
        if not broadcasts_to(mask.shape, batch):
            raise ValueError(
                f"where.shape={tuple(mask.shape)} has the labels' rank, so it holds one flag"
                f" per example and must broadcast to {batch}; a class mask has the logits'"
                f" rank ({len(shape)}), e.g. where[None, :]"
            )
        return check_where(jnp.expand_dims(mask, axes), shape, axes)
    raise ValueError(
        f"where.shape={tuple(mask.shape)} must have the logits' rank {len(shape)} (one flag"
        f" per element, NumPy broadcasting) or the labels' rank {len(batch)} (one flag per"
        f" example), for logits of shape {tuple(shape)}"
    )


def prepare_where(
    where: jax.typing.ArrayLike | None, shape: tuple[int, ...], axes: tuple[int, ...]
) -> Mask:
    """The ``where`` mask, checked (:func:`check_where`: NumPy broadcasting only, ``axes``
    the normalised ones) and with leading size-1 axes added, so that it has ``shape``'s
    rank and broadcasts to it."""
    if where is None:
        return None
    mask = check_where(where, shape, axes)
    return jnp.reshape(mask, (1,) * (len(shape) - mask.ndim) + mask.shape)


def _allowed(low: float, high: float | None, finite: bool, low_open: bool) -> str:
    """The allowed values, as an error message states them: ``lie in [0, 1]``, ``lie in
    [0, inf)``, ``be > 0 and finite``, ``be a finite number``."""
    if low == -np.inf and high is None:
        return "be a finite number" if finite else "be a number"
    if low_open and high is None:
        return f"be > {low:g}" + (" and finite" if finite else "")
    upper = f"{high:g}]" if high is not None else ("inf)" if finite else "inf]")
    return f"lie in {'(' if low_open else '['}{low:g}, {upper}"


def hyperparameter(
    name: str, value: object, low: float, high: float | None, *, finite: bool = False,
    low_open: bool = False,
) -> tuple[jax.Array, bool]:
    """Checks a scalar hyper-parameter and says whether it can be skipped at compile time.

    Returns the value as an array (so a traced or changing value does not recompile) and a
    static flag that is ``False`` only for a concrete zero, letting the compiled code drop
    the term entirely. Concrete values are range-checked (``ValueError`` stating the
    allowed values; NaN is never allowed); traced ones cannot be, and are replaced by NaN
    where they fall outside the range. The range is ``[low, high]`` (``high=None``: no
    upper bound, ``+inf`` included, as ``soft_cap`` needs; ``low_open``: ``low`` itself
    excluded, as for a temperature); ``finite=True`` also refuses ``+-inf``, for a weight
    such as ``z_loss`` whose infinite value has no meaning (its loss would be a
    plausible-looking ``inf``, not NaN).
    """
    arr = jnp.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(arr.shape)}")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}")
    if isinstance(value, jax.core.Tracer):
        # A traced value cannot raise; out of range it becomes NaN, so the result is NaN
        # rather than a plausible number.
        # Added rather than selected, so that the derivative with respect to the value is
        # still 1 (a where would send it a silent 0).
        ok = arr > low if low_open else arr >= low
        if high is not None:
            ok = ok & (arr <= high)
        if finite:
            ok = ok & jnp.isfinite(arr)
        return arr + jnp.where(ok, 0.0, jnp.nan), True
    concrete = float(np.asarray(value))
    above = concrete > low if low_open else concrete >= low
    if not (above and (high is None or concrete <= high) and
            (not finite or np.isfinite(concrete))):
        raise ValueError(f"{name} must {_allowed(low, high, finite, low_open)}, got {concrete}")
    return arr, concrete != 0.0


def compute_dtype(*dtypes: jax.typing.DTypeLike) -> np.dtype:
    """The dtype the math runs in for inputs of ``dtypes``: their promoted type, at least
    float32, so bf16/f16 inputs get f32 accuracy (and float64 ones, under x64, float64)."""
    return np.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))
