"""Argument checks for the public API: every message names the argument, what was expected and
what came. They run on every call, so each is a handful of attribute reads."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch


def tensor(name: str, value: object, dtypes: tuple[torch.dtype, ...], ndim: int) -> torch.Tensor:
    is_tensor(name, value)
    dtype(name, value, dtypes)
    dims(name, value, ndim)
    return value


def is_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def dtype(name: str, value: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if value.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {expected}, got {value.dtype}")


def dims(name: str, value: torch.Tensor, ndim: int) -> None:
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")


def shape(name: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(value.shape)}")


def tma_rows(name: str, value: torch.Tensor) -> None:
    """Row-major with unit inner stride, 16-byte aligned base and row pitch (what TMA can address).
    An empty tensor addresses nothing, so any strides do."""
    if value.numel() == 0:
        return
    size = value.element_size()
    if value.stride(-1) != 1 and value.shape[-1] > 1:
        raise ValueError(f"{name}: expected the last dimension contiguous (K-major / row-major), "
                         f"got strides {tuple(value.stride())}")
    for dim in range(value.dim() - 1):
        if (value.stride(dim) * size) % 16:
            raise ValueError(f"{name}: expected every row pitch to be a multiple of 16 bytes, got strides "
                             f"{tuple(value.stride())} of {size}-byte elements (shape {tuple(value.shape)})")
    if value.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer, got {value.data_ptr():#x}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of all ``tensors``: a CUDA GPU (the kernels) or the CPU (the reference)."""
    devices = {name: t.device for name, t in tensors.items()}
    for name, dev in devices.items():
        if dev.type not in ("cuda", "cpu"):
            raise ValueError(f"{name}: expected a CUDA or CPU tensor, got one on {dev} (meta tensors have no data; "
                             f"under torch.compile the ops trace without it)")
    first = next(iter(devices.values()))
    if any(dev != first for dev in devices.values()):
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"expected all tensors on one device, got {listing}")
    return first


def byte_span(value: torch.Tensor) -> int:
    """Bytes from the data pointer to the end of the last element (0 for an empty tensor)."""
    if value.numel() == 0:
        return 0
    return (sum((size - 1) * stride for size, stride in zip(value.shape, value.stride(), strict=True)) + 1) \
        * value.element_size()


def no_overlap(names: tuple[str, ...], pointers: tuple[int, ...], spans: tuple[int, ...]) -> None:
    """The tensor written (first: its data pointer and byte span) shares no byte with the others: a
    kernel would read what it has already overwritten. Byte ranges, so two strided views that
    interleave without sharing an element count as overlapping too."""
    low = pointers[0]
    high = low + spans[0]
    for i in range(1, len(pointers)):
        if spans[i] and pointers[i] < high and low < pointers[i] + spans[i]:
            raise ValueError(f"{names[0]}: expected memory apart from {names[i]}'s, got bytes "
                             f"[{low:#x}, {high:#x}) overlapping its [{pointers[i]:#x}, {pointers[i] + spans[i]:#x})")


def int_at_least(name: str, value: object, minimum: int) -> int:
    # bool is an Integral too, but True as a count is a caller's slip, not a number.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def k_segments(ks: object, sum_k: int | None, alignment: int) -> list[int]:
    """The K-grouped GEMMs' segment lengths, given on the host: ints >= 0, multiples of ``alignment``,
    summing to ``sum_k`` (when given)."""
    if isinstance(ks, torch.Tensor) or not isinstance(ks, Sequence):
        raise TypeError(f"ks: expected a list of ints (the segments' lengths, on the host), got {type(ks).__name__}")
    lengths = [int_at_least(f"ks[{i}]", value, 0) for i, value in enumerate(ks)]
    for i, length in enumerate(lengths):
        if length % alignment:
            raise ValueError(f"ks[{i}]: expected a multiple of {alignment}, got {length}")
    if sum_k is not None and sum(lengths) != sum_k:
        raise ValueError(f"ks: expected lengths summing to {sum_k} (a's rows), got {sum(lengths)}")
    return lengths
