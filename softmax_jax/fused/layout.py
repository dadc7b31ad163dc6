"""Block sizes of the fused losses: a small frozen config with declared bounds and a
documented default rule (:meth:`BlockLayout.default`).

Two layouts exist, chosen by ``vocab_block``:

- **held rows** (``vocab_block >= V``): a token block's whole rows of logits are computed once
  and reused for the gradient, three matrix products in all (Liger Kernel's layout), when the
  forward pass forms the gradient (the ``"mean"`` and ``"sum"`` reductions). Per-token outputs
  (``reduction="none"``, ``linear_log_probs``) form it in the backward pass, which recomputes
  the logits in either layout. The float32 ``dW`` is accumulated over token blocks, so this
  layout needs a ``D x V`` float32 accumulator.
- **two-level blocks** (``vocab_block < V``): ``token_block x vocab_block`` tiles; the
  statistics pass walks the vocabulary inside each token block, and the gradient pass walks
  the tokens inside each vocabulary block, recomputing the logits (four matrix products, as
  Cut Cross-Entropy does). ``dW`` is then accumulated in float32 one vocabulary block at a
  time, so no ``D x V`` float32 array exists even for bfloat16 inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["BlockLayout"]

# Declared bounds of the automatic rule (see BlockLayout.default).
HELD_ELEMENTS = 2**23  # logits of one held token block (32 MiB of float32)
MIN_HELD_TOKENS = 256  # fewer held rows make the matmuls skinny: use two-level blocks
TILE_TOKENS = 2048  # token block of the two-level layout
TILE_VOCAB = 2048  # vocabulary block of the two-level layout
TILE_VOCAB_PER_TOKEN = 1024  # its vocabulary block for per-token outputs
# Largest float32 D x V accumulator the held layout may use for narrow (bf16/f16) weights.
NARROW_DW_BYTES = 64 * 2**20
# Span of dW columns that narrow (bf16/f16) weights gather, as bits, before one write into dW.
NARROW_SPAN_BYTES = 32 * 2**20
UPDATE_CHUNK = 4096  # column chunks in which held rows produce dx, dW and db


class BlockLayout(NamedTuple):
    """Block sizes of one fused call (hashable, so it can be a static argument).

    Attributes:
      token_block: rows of ``x`` per block, ``1 <= token_block``.
      vocab_block: vocabulary columns per block, ``1 <= vocab_block``; ``>= V`` (the local
        vocabulary) selects the held-rows layout.
    """

    token_block: int
    vocab_block: int

    def holds_rows(self, v: int) -> bool:
        """Whether whole rows of ``v`` logits are held (the three-matmul layout)."""
        return self.vocab_block >= v

    @staticmethod
    def default(
        n: int, d: int, v: int, weight_itemsize: int = 4, heads: int = 1,
        per_token: bool = False,
    ) -> BlockLayout:
        """The automatic rule, chosen by interleaved timings on a 2-core CPU against the
        two-level chunked anchor (``scripts/experiments/chunked.py``).

        Whole rows are held when a block of at least ``MIN_HELD_TOKENS`` (256) rows fits in
        ``HELD_ELEMENTS`` (``2**23``) logits, i.e. ``V <= 32768`` per device, and, for
        weights narrower than float32, when the float32 ``D x V`` accumulator stays within
        ``NARROW_DW_BYTES`` (64 MiB). The token block then holds about ``2**23`` logits over
        all heads (``2**23 / (V * heads)`` rows; distillation has two). Otherwise two-level
        ``TILE_TOKENS x TILE_VOCAB`` (2048 x 2048) blocks. Both are clipped to ``N`` and
        ``V``.

        Per-token outputs always take two-level blocks, ``TILE_TOKENS x
        TILE_VOCAB_PER_TOKEN`` (2048 x 1024): holding rows saves a product only when the
        forward pass forms the gradient, and the wide tiles run the four products faster
        than 256-row blocks of whole rows (for ``linear_log_probs`` with its entropy at
        N=2048, D=128, V=32768: 0.53x to 0.55x of the materialised composition's time,
        against 0.64x to 0.68x with whole rows). Below 1024 classes the tile is whole rows.

        Args:
          n: tokens. d: model width (of the widest head). v: vocabulary columns on this
            device. weight_itemsize: bytes per element of ``w`` (2 for bfloat16).
          heads: linear heads whose blocks are held together (2 for distillation).
          per_token: whether the gradient is formed in the backward pass (per-token
            outputs).
        """
        if per_token:
            return BlockLayout(min(n, TILE_TOKENS), min(v, TILE_VOCAB_PER_TOKEN))
        held = HELD_ELEMENTS // v >= MIN_HELD_TOKENS
        if weight_itemsize < 4 and d * v * 4 > NARROW_DW_BYTES:
            held = False
        if held:
            return BlockLayout(_held_token_block(n, v, heads), v)
        return BlockLayout(min(n, TILE_TOKENS), min(v, TILE_VOCAB))

    @staticmethod
    def resolve(
        n: int, d: int, v: int, weight_itemsize: int,
        token_block: object = None, vocab_block: object = None, heads: int = 1,
        per_token: bool = False,
    ) -> BlockLayout:
        """The default rule with any explicitly given size replacing its part (checked)."""
        tb, vb = _checked("token_block", token_block), _checked("vocab_block", vocab_block)
        auto = BlockLayout.default(n, d, v, weight_itemsize, heads, per_token)
        if vb is None:
            vb = auto.vocab_block
        vb = min(vb, v)
        if tb is None:
            tb = auto.token_block if vb == auto.vocab_block else (
                _held_token_block(n, vb, heads) if vb >= v else min(n, TILE_TOKENS))
        return BlockLayout(min(tb, n), vb)


def _held_token_block(n: int, v: int, heads: int) -> int:
    """Held rows: about ``HELD_ELEMENTS`` logits over all heads, a multiple of 8 rows (at
    least 8), clipped to ``n``."""
    return min(n, max(8, HELD_ELEMENTS // (v * heads) // 8 * 8))


def _checked(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)
