"""Atomic files and pytree checkpoints for the training scripts.

A checkpoint is one ``.npz`` archive: the pytree's leaves as plain numpy arrays
(``leaf_0000``, ``leaf_0001``, ...) plus a JSON string of metadata. The tree structure is not
stored; the loader takes it from a *template* (a freshly initialised state of the same model)
and checks every leaf's shape and dtype against it. That keeps loading free of ``pickle``
(no code runs when a file is opened, ``allow_pickle=False``) and turns a checkpoint from a
different model into a clear error instead of a silently misassembled state.

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, which is atomic on POSIX and Windows: after a crash the previous checkpoint
is still whole, never half-written.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_json",
    "load_checkpoint",
    "save_checkpoint",
]

PathLike = str | os.PathLike[str]


class CheckpointError(Exception):
    """A checkpoint cannot be used. The message is one line naming the path."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (so the rename cannot cross file systems), opened
    # with "x" (never clobbers) and the usual umask-derived permissions, unlike mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            # Make the bytes durable before the rename makes them visible.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Leave no stray temporary file behind, whatever interrupted us (KeyboardInterrupt too).
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(path: PathLike, tree: Any, meta: dict[str, Any]) -> None:
    """Saves a pytree of arrays and a JSON-serialisable ``meta`` dict, atomically.

    Args:
      path: the ``.npz`` file to (over)write.
      tree: a pytree whose leaves are arrays (JAX or numpy); typed PRNG keys must be passed
        through ``jax.random.key_data`` first.
      meta: JSON-serialisable metadata (epoch, metrics, configuration).
    """
    leaves = jax.tree_util.tree_leaves(jax.device_get(tree))
    arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    buffer = io.BytesIO()
    arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(buffer, allow_pickle=False, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: PathLike, template: Any) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Args:
      path: the ``.npz`` file.
      template: a pytree with the structure, shapes and dtypes the checkpoint must have.

    Returns:
      ``(tree, meta)``: the pytree rebuilt in ``template``'s structure with numpy leaves,
      and the metadata dict.

    Raises:
      CheckpointError: the file is missing, not a checkpoint, or holds a different model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    leaves_t, treedef = jax.tree_util.tree_flatten(template)
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"][()]))
            names = sorted(k for k in archive.files if k.startswith("leaf_"))
            leaves = [archive[name] for name in names]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        detail = str(exc).replace("\n", " ") or type(exc).__name__
        raise CheckpointError(path, f"not a readable checkpoint ({detail})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(path, "not a readable checkpoint (metadata is not a JSON object)")
    if len(leaves) != len(leaves_t):
        raise CheckpointError(
            path, f"holds {len(leaves)} arrays, the model has {len(leaves_t)}: a different model?"
        )
    for i, (got, want) in enumerate(zip(leaves, leaves_t, strict=True)):
        want_shape, want_dtype = np.shape(want), np.asarray(want).dtype
        if got.shape != want_shape or got.dtype != want_dtype:
            raise CheckpointError(
                path,
                f"array {i} is {got.dtype}{list(got.shape)}, the model expects"
                f" {want_dtype}{list(want_shape)}: a different model?",
            )
    return jax.tree_util.tree_unflatten(treedef, leaves), meta
