"""What the GEMM ops of every family share: device, layout and group-value checks, and the rows a
grouped GEMM with K = 0 zeroes."""

from __future__ import annotations

import torch

from .. import checks, device
from ..gemm.desc import GemmType
from ..kernels.fp8_gemm import CONTIGUOUS_ALIGNMENT


def check_cuda(tensors: dict[str, torch.Tensor]) -> None:
    dev = checks.same_device(**tensors)
    if dev.type == "cuda":
        device.require_sm90(dev)


def check_addend(c: torch.Tensor | None, d: torch.Tensor, shape: tuple[int, ...],
                 tensors: dict[str, torch.Tensor]) -> None:
    """C of ``D = C + ...`` when given: float32 of D's ``shape``, D float32 too; added to ``tensors``
    (for check_cuda)."""
    if c is None:
        return
    checks.tensor("c", c, (torch.float32,), len(shape))
    checks.shape("c", c, shape)
    if d.dtype != torch.float32:
        raise TypeError(f"d: with c given (D = C + ...) d must be torch.float32, got {d.dtype}")
    tensors["c"] = c


def start_sum(d: torch.Tensor, c: torch.Tensor | None, separate_c: bool) -> None:
    """D = C (or 0, an empty sum) before a K-grouped kernel adds the experts' products into D."""
    if separate_c:
        d.copy_(c)
    elif c is None:
        d.zero_()


def check_experts_stacked(name: str, t: torch.Tensor) -> None:
    """A [G, rows, K]-like tensor whose experts follow each other at the row pitch, so the kernels
    can see it as one [G * rows, K] matrix."""
    if t.shape[0] > 1 and t.numel() and t.stride(0) != t.shape[1] * t.stride(1):
        raise ValueError(f"{name}: expected the experts stacked without gaps (stride(0) == shape[1] * stride(1)), "
                         f"got strides {tuple(t.stride())} for shape {tuple(t.shape)}")


def check_group_values(kind: GemmType, groups: torch.Tensor, num_groups: int, rows: int) -> None:
    """set_check_groups: read the layout or masked_m (a synchronisation) and name bad entries, which
    the kernels would otherwise treat as padding or clamp."""
    values = groups.cpu()
    if kind is GemmType.CONTIGUOUS:
        bad = ((values < -1) | (values >= num_groups)).nonzero().flatten()
        what = f"expert ids in [0, {num_groups}) or -1 (padding)"
    elif kind is GemmType.PSUM:
        previous = torch.cat([values.new_zeros(1), values[:-1]])
        bad = ((values < previous) | (values > rows)).nonzero().flatten()
        what = f"non-decreasing end rows in [0, {rows}]"
    elif kind is GemmType.K_GROUPED:
        ends = values.long().cumsum(0)
        bad = ((values < 0) | (values % CONTIGUOUS_ALIGNMENT != 0) | (ends > rows)).nonzero().flatten()
        what = f"segment lengths >= 0, multiples of {CONTIGUOUS_ALIGNMENT}, summing to at most {rows}"
    else:
        bad = ((values < 0) | (values > rows)).nonzero().flatten()
        what = f"row counts in [0, {rows}]"
    if bad.numel():
        name = "masked_m" if kind is GemmType.MASKED else "grouped_layout"
        shown = ", ".join(f"[{i}] = {values[i].item()}" for i in bad[:8].tolist())
        raise ValueError(f"{name}: expected {what}; {bad.numel()} entries are not: {shown}")


def spans(*tensors: torch.Tensor) -> tuple[int, ...]:
    return tuple(checks.byte_span(t) for t in tensors)


def overlap_guard(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], c: torch.Tensor | None):
    """A bound call's check of the data pointers of tensors of these shapes and strides, D first:
    ``guard(tensors, c)`` raises where D shares bytes with another, or a C apart from D with any of
    them, and returns their pointers and whether C is a tensor apart from D (C given and not D)."""
    tensor_spans = spans(*tensors)
    c_spans = None if c is None else spans(c, *tensors)
    c_like_d = c is not None and c.stride() == tensors[0].stride()

    def guard(tensors: tuple[torch.Tensor, ...], c: torch.Tensor | None) -> tuple[int, ...]:
        pointers = tuple(t.data_ptr() for t in tensors)
        checks.no_overlap(names, pointers, tensor_spans)
        separate_c = c is not None and (c.data_ptr() != pointers[0] or not c_like_d)
        if separate_c:
            checks.no_overlap(("c", *names), (c.data_ptr(), *pointers), c_spans)
        return (*pointers, separate_c)
    return guard


def zero_expert_rows(kind: GemmType, d: torch.Tensor, groups: torch.Tensor, num_groups: int) -> None:
    """K = 0: the rows of D that belong to an expert are zero (an empty sum), as the kernels' row
    rules would pick them; the rest stays untouched. Whole-tensor ops on the GPU, no host read, so
    CUDA graphs can capture it."""
    if kind is GemmType.MASKED:
        counts = groups.clamp(0, d.shape[1])
        owned = torch.arange(d.shape[1], device=d.device) < counts[:, None]
    elif kind is GemmType.CONTIGUOUS:
        owned = (groups >= 0) & (groups < num_groups)
    else:  # psum: the first expert whose aligned end lies past the row owns it if the row is below its end
        rows = torch.arange(d.shape[0], device=d.device)
        ends = groups.clamp(min=0).long()
        first = torch.searchsorted((ends + 127) // 128 * 128, rows, right=True)
        owned = (first < num_groups) & (rows < ends.clamp(max=d.shape[0])[first.clamp(max=num_groups - 1)])
    d.masked_fill_(owned[..., None], 0)
