"""Integer helpers shared by every layer (sizes, alignment, TMA's 16-byte rule)."""

from __future__ import annotations

TMA_ALIGNMENT_BYTES = 16


def ceil_div(a: int, b: int) -> int:
    """Return ``ceil(a / b)`` for integers, ``b > 0``."""
    return (a + b - 1) // b


def align(x: int, a: int) -> int:
    """Round ``x`` up to the next multiple of ``a`` (``a > 0``)."""
    return ceil_div(x, a) * a


def get_tma_aligned_size(x: int, element_size: int) -> int:
    """Round ``x`` (an element count) up so that ``x * element_size`` is a multiple of 16 bytes.

    TMA requires every non-innermost global stride to be a multiple of 16 bytes.
    """
    if element_size <= 0 or TMA_ALIGNMENT_BYTES % element_size != 0:
        raise ValueError(f"element_size: expected a divisor of {TMA_ALIGNMENT_BYTES}, got {element_size}")
    return align(x, TMA_ALIGNMENT_BYTES // element_size)
