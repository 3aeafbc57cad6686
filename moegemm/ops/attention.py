"""``fp8_mqa_logits`` and ``fp8_paged_mqa_logits``, and ``fp8_fp4_mqa_logits`` and
``fp8_fp4_paged_mqa_logits`` that also take FP4 inputs: the lightning indexer's logits, over a sequence
of keys and over a paged cache (checks, the bound calls, the public functions and the paged schedule)."""

from __future__ import annotations

import torch

from .. import checks, device, reference
from ..gemm.config import tma_pitch
from ..kernels import mqa_logits
from . import gemm_common
from .dispatch import Op

LOGITS_DTYPES = (torch.float32, torch.bfloat16)
FP4 = (torch.int8, torch.uint8)  # e2m1 codes packed two per byte, element 2i in the low nibble


def _check_gpu_layout(weights: torch.Tensor, **contiguous: torch.Tensor) -> None:
    """What the kernels' loads need: the tensors named contiguous, the weights' rows 16 bytes apart."""
    for name, t in contiguous.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(t.stride())}")
    if weights.shape[0] > 1 and (weights.stride(1) != 1 or weights.stride(0) % 4):
        raise ValueError(f"weights: expected a unit inner stride and rows 16-byte aligned, got strides "
                         f"{tuple(weights.stride())}")


def _check_q(q, q_sf, ndim: int) -> tuple[int, ...]:
    """q's shape, its last dim D: e4m3 q alone, or packed e2m1 q (D / 2 bytes a row) and its exponents,
    int32 of four UE8M0 bytes a row (q[1], one per row: D <= 128)."""
    if q_sf is None:
        checks.tensor("q", q, (torch.float8_e4m3fn,), ndim)
        return tuple(q.shape)
    checks.tensor("q[0]", q, FP4, ndim)
    checks.tensor("q[1]", q_sf, (torch.int32,), ndim - 1)
    checks.shape("q[1]", q_sf, tuple(q.shape[:-1]))
    if not 0 < q.shape[-1] <= 64:
        raise ValueError(f"q[0]: expected D / 2 = 1 to 64 bytes a row (one int32 of exponents covers D <= 128), "
                         f"got shape {tuple(q.shape)}")
    return (*q.shape[:-1], 2 * q.shape[-1])


def _check(q, q_sf, kv, kv_sf, weights, ks, ke, logits, clean_logits, max_seqlen_k) -> None:
    fp4 = q_sf is not None
    seq_len, heads, head_dim = _check_q(q, q_sf, 3)
    checks.tensor("kv[0]", kv, FP4 if fp4 else (torch.float8_e4m3fn,), 2)
    seq_len_kv, row = kv.shape[0], mqa_logits.key_bytes(head_dim, fp4)
    if kv.shape[1] != row:
        raise ValueError(f"kv[0]: expected [S_kv, {row}] ({'D / 2 bytes' if fp4 else 'D'} with D = {head_dim} from q), "
                         f"got {tuple(kv.shape)}")
    checks.tensor("kv[1]", kv_sf, (torch.int32,) if fp4 else (torch.float32,), 1)
    checks.shape("kv[1]", kv_sf, (seq_len_kv,))
    checks.tensor("weights", weights, (torch.float32,), 2)
    checks.shape("weights", weights, (seq_len, heads))
    for name, t in (("cu_seq_len_k_start", ks), ("cu_seq_len_k_end", ke)):
        checks.tensor(name, t, (torch.int32,), 1)
        checks.shape(name, t, (seq_len,))
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int) or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_k: expected an int >= 0, got {max_seqlen_k!r}")
    if max_seqlen_k and clean_logits:
        raise ValueError("clean_logits: compressed logits (max_seqlen_k > 0) are not cleaned; pass clean_logits=False")
    q_tensors = {"q[0]": q, "q[1]": q_sf} if fp4 else {"q": q}
    gemm_common.check_cuda({**q_tensors, "kv[0]": kv, "kv[1]": kv_sf, "weights": weights, "cu_seq_len_k_start": ks,
                            "cu_seq_len_k_end": ke, "logits": logits})
    if not q.is_cuda:
        return
    if heads not in mqa_logits.HEADS or head_dim not in mqa_logits.HEAD_DIMS:
        raise ValueError(f"q: expected H in {mqa_logits.HEADS} and D in {mqa_logits.HEAD_DIMS} on the GPU, got "
                         f"[S, H, D] = {(seq_len, heads, head_dim)}")
    _check_gpu_layout(weights, **q_tensors, **{"kv[0]": kv, "kv[1]": kv_sf, "cu_seq_len_k_start": ks,
                                               "cu_seq_len_k_end": ke})


def _check_aligned(names: tuple[str, ...], pointers: tuple[int, ...]) -> None:
    """TMA's 16-byte aligned addresses: the call's first misaligned one named (called on a miss only,
    off the launch path)."""
    for name, pointer in zip(names, pointers, strict=True):
        if pointer % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned address (TMA), got {pointer:#x}")


def _bind(q, q_sf, kv, kv_sf, weights, ks, ke, logits, clean_logits, max_seqlen_k):
    seq_len, heads, head_dim = _check_q(q, q_sf, 3)
    seq_len_kv, fp4 = kv.shape[0], q_sf is not None
    if not q.is_cuda:
        def run_reference(q, q_sf, kv, kv_sf, weights, ks, ke, logits, clean_logits, max_seqlen_k):
            logits.copy_(reference.fp8_fp4_mqa_logits((q, q_sf), (kv, kv_sf), weights, ks, ke, clean_logits,
                                                      max_seqlen_k, logits.dtype))
        return run_reference

    if seq_len == 0 or logits.shape[1] == 0:
        return lambda *args: None
    if seq_len_kv == 0:  # no key: every element is outside its row's range
        return lambda q, q_sf, kv, kv_sf, weights, ks, ke, logits, *flags: logits.fill_(float("-inf"))

    index = q.get_device()
    plan = mqa_logits.plan(seq_len, seq_len_kv, heads, head_dim, tma_pitch(weights), logits, max_seqlen_k > 0,
                           clean_logits, device.device_facts(index), pdl=device.get_pdl(), fp4=fp4)

    tma_names = ("q[0]", "q[1]", "kv[0]", "kv[1]", "weights") if fp4 else ("q", "q", "kv[0]", "kv[1]", "weights")

    def run_kernel(q, q_sf, kv, kv_sf, weights, ks, ke, logits, clean_logits, max_seqlen_k):
        # The FP8 kernels take no exponents: q's address stands in for them.
        tma_pointers = (q.data_ptr(), q_sf.data_ptr() if fp4 else q.data_ptr(), kv.data_ptr(), kv_sf.data_ptr(),
                        weights.data_ptr())
        if (tma_pointers[0] | tma_pointers[1] | tma_pointers[2] | tma_pointers[3] | tma_pointers[4]) & 15:
            _check_aligned(tma_names, tma_pointers)
        plan.launch_pointers(index, *tma_pointers, ks.data_ptr(), ke.data_ptr(), logits.data_ptr())
    return run_kernel


_MQA_LOGITS = Op("fp8_mqa_logits_into",
                 "(Tensor q, Tensor? q_sf, Tensor kv, Tensor kv_sf, Tensor weights, Tensor ks, Tensor ke, "
                 "Tensor(a!) logits, bool clean_logits, int max_seqlen_k) -> ()", ("logits",), _check, _bind)


def _mqa_logits(q, q_sf, kv, weights, ks, ke, clean_logits, max_seqlen_k, logits_dtype) -> torch.Tensor:
    """The logits of the checked call, allocated here."""
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError(f"kv: expected a (keys, scales) pair, got {type(kv).__name__}")
    if logits_dtype not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype: expected torch.float32 or torch.bfloat16, got {logits_dtype}")
    checks.is_tensor("kv[0]", kv[0])
    columns = max_seqlen_k if isinstance(max_seqlen_k, int) and max_seqlen_k > 0 else kv[0].shape[0]
    logits = torch.empty(q.shape[0], columns, dtype=logits_dtype, device=q.device)
    _MQA_LOGITS(q, q_sf, kv[0], kv[1], weights, ks, ke, logits, bool(clean_logits), max_seqlen_k)
    return logits


def _q_pair(q: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp8_fp4_*'s q: ``(e4m3 q, None)`` or ``(packed e2m1 q, int32 exponents)``."""
    if not isinstance(q, (tuple, list)) or len(q) != 2:
        raise TypeError(f"q: expected a (values, scales or None) pair, got {type(q).__name__}")
    checks.is_tensor("q[0]", q[0])
    if q[1] is not None:
        checks.is_tensor("q[1]", q[1])
    return q[0], q[1]


def fp8_mqa_logits(q: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor,
                   cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor, clean_logits: bool = True,
                   max_seqlen_k: int = 0, logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The lightning indexer's logits (DeepSeek-V3.2): ``logits[i, j] = sum_h weights[i, h] *
    relu(q[i, h] . k[j])``, k[j] = kv[0][j] * kv[1][j], for the keys ``cu_seq_len_k_start[i] <= j <
    cu_seq_len_k_end[i]`` of query i.

    Args:
        q: float8_e4m3fn ``[S, H, D]``, contiguous; on the GPU H in (32, 64), D in (32, 64, 128).
        kv: ``(float8_e4m3fn [S_kv, D], float32 [S_kv])``: the keys and one scale per key, contiguous.
        weights: float32 ``[S, H]``, unit inner stride, rows 16-byte aligned.
        cu_seq_len_k_start, cu_seq_len_k_end: int32 ``[S]``, each query's key range (any values:
            keys outside ``[0, S_kv)`` do not exist).
        clean_logits: write -inf at every key of a row outside its range (otherwise those elements
            are left unspecified).
        max_seqlen_k: 0 for logits ``[S, S_kv]``; > 0 for the compressed ``[S, max_seqlen_k]``, column
            c of row i being key ``ks[i] + c`` (elements past the range unspecified; needs
            ``clean_logits=False``).
        logits_dtype: torch.float32 or torch.bfloat16.

    Returns:
        The logits, a new contiguous tensor. CPU tensors run the reference.
    """
    checks.is_tensor("q", q)
    return _mqa_logits(q, None, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k,
                       logits_dtype)


def fp8_fp4_mqa_logits(q: tuple[torch.Tensor, torch.Tensor | None], kv: tuple[torch.Tensor, torch.Tensor],
                       weights: torch.Tensor, cu_seq_len_k_start: torch.Tensor, cu_seq_len_k_end: torch.Tensor,
                       clean_logits: bool = True, max_seqlen_k: int = 0,
                       logits_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`fp8_mqa_logits` on FP4 inputs (DeepGEMM's ``fp8_fp4_mqa_logits``), widened to FP8 on the
    chip for Hopper's tensor cores; FP8 inputs as ``(q, None)`` run :func:`fp8_mqa_logits`.

    Args:
        q: ``(int8 [S, H, D/2], int32 [S, H])``: e2m1 codes two per byte (element 2i in the low nibble)
            and each row's 1x32 UE8M0 scales packed four per int32, as
            ``per_token_cast_to_fp4(x, use_ue8m0=True, gran_k=32, use_packed_ue8m0=True)`` makes them
            (D <= 128), contiguous; or ``(float8_e4m3fn [S, H, D], None)``.
        kv: ``(int8 [S_kv, D/2], int32 [S_kv])`` likewise, or with FP8 q ``(float8_e4m3fn [S_kv, D],
            float32 [S_kv])``.
        weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k, logits_dtype: as
            :func:`fp8_mqa_logits`.

    Returns:
        The logits of the dequantised inputs, a new contiguous tensor. CPU tensors run the reference.
    """
    q_values, q_sf = _q_pair(q)
    return _mqa_logits(q_values, q_sf, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits,
                       max_seqlen_k, logits_dtype)


def _check_paged(q, q_sf, kv_cache, weights, context_lens, block_table, schedule, logits, clean_logits) -> None:
    fp4 = q_sf is not None
    batch, next_n, heads, head_dim = _check_q(q, q_sf, 4)
    checks.tensor("kv_cache", kv_cache, (torch.uint8,), 4)
    row = mqa_logits.key_bytes(head_dim, fp4)
    if kv_cache.shape[1:] != (mqa_logits.PAGE_KEYS, 1, row + 4):
        raise ValueError(f"kv_cache: expected [pages, {mqa_logits.PAGE_KEYS}, 1, {row + 4}] "
                         f"({'D / 2' if fp4 else 'D'} + 4 bytes a key), got {tuple(kv_cache.shape)}")
    checks.tensor("weights", weights, (torch.float32,), 2)
    checks.shape("weights", weights, (batch * next_n, heads))
    checks.tensor("context_lens", context_lens, (torch.int32,), 2)
    checks.shape("context_lens", context_lens, (batch, next_n))
    checks.tensor("block_table", block_table, (torch.int32,), 2)
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table: expected [{batch}, max_blocks], got {tuple(block_table.shape)}")
    checks.tensor("schedule_meta", schedule, (torch.int32,), 2)
    if schedule.shape[0] < 2 or schedule.shape[1] != 2:
        raise ValueError(f"schedule_meta: expected [num_sms + 1, 2] from get_paged_mqa_logits_metadata, got "
                         f"{tuple(schedule.shape)}")
    q_tensors = {"q[0]": q, "q[1]": q_sf} if fp4 else {"q": q}
    gemm_common.check_cuda({**q_tensors, "kv_cache": kv_cache, "weights": weights, "context_lens": context_lens,
                            "block_table": block_table, "schedule_meta": schedule, "logits": logits})
    if not q.is_cuda:
        return
    if heads not in mqa_logits.HEADS or head_dim not in mqa_logits.HEAD_DIMS or next_n not in mqa_logits.NEXT_NS:
        raise ValueError(f"q: expected next_n in {mqa_logits.NEXT_NS}, H in {mqa_logits.HEADS} and D in "
                         f"{mqa_logits.HEAD_DIMS} on the GPU, got [B, next_n, H, D] = "
                         f"{(batch, next_n, heads, head_dim)}")
    _check_gpu_layout(weights, **q_tensors, kv_cache=kv_cache, context_lens=context_lens, block_table=block_table,
                      schedule_meta=schedule)


def _bind_paged(q, q_sf, kv_cache, weights, context_lens, block_table, schedule, logits, clean_logits):
    batch, next_n, heads, head_dim = _check_q(q, q_sf, 4)
    fp4 = q_sf is not None
    if not q.is_cuda:
        def run_reference(q, q_sf, kv_cache, weights, context_lens, block_table, schedule, logits, clean_logits):
            logits.copy_(reference.fp8_fp4_paged_mqa_logits((q, q_sf), kv_cache, weights, context_lens, block_table,
                                                            schedule, logits.shape[1], clean_logits))
        return run_reference
    if batch == 0 or logits.shape[1] == 0:
        return lambda *args: None
    if kv_cache.shape[0] == 0:
        raise ValueError("kv_cache: expected at least one page")
    index = q.get_device()
    plan = mqa_logits.plan_paged(batch, next_n, heads, head_dim, kv_cache.shape[0], block_table.shape[1],
                                 tma_pitch(weights), logits, clean_logits, schedule.shape[0] - 1,
                                 device.device_facts(index), pdl=device.get_pdl(), fp4=fp4)

    tma_names = ("q[0]", "q[1]", "kv_cache", "weights") if fp4 else ("q", "q", "kv_cache", "weights")

    def run_kernel(q, q_sf, kv_cache, weights, context_lens, block_table, schedule, logits, clean_logits):
        tma_pointers = (q.data_ptr(), q_sf.data_ptr() if fp4 else q.data_ptr(), kv_cache.data_ptr(),
                        weights.data_ptr())
        if (tma_pointers[0] | tma_pointers[1] | tma_pointers[2] | tma_pointers[3]) & 15:
            _check_aligned(tma_names, tma_pointers)
        plan.launch_pointers(index, *tma_pointers, context_lens.data_ptr(), block_table.data_ptr(),
                             schedule.data_ptr(), logits.data_ptr())
    return run_kernel


_PAGED_MQA_LOGITS = Op("fp8_paged_mqa_logits_into",
                       "(Tensor q, Tensor? q_sf, Tensor kv_cache, Tensor weights, Tensor context_lens, "
                       "Tensor block_table, Tensor schedule_meta, Tensor(a!) logits, bool clean_logits) -> ()",
                       ("logits",), _check_paged, _bind_paged)


def get_paged_mqa_logits_metadata(context_lens: torch.Tensor, block_kv: int, num_sms: int) -> torch.Tensor:
    """The schedule of :func:`fp8_paged_mqa_logits` (compute it once per decode step, pass it to every
    layer): int32 ``[num_sms + 1, 2]`` on the device of ``context_lens``, made there without reading any
    value back (CUDA-graph safe). ``context_lens`` int32 ``[B, next_n]``; ``block_kv`` the cache's page
    size, 64; ``num_sms`` the CTAs the work is split over (the GPU's SMs: ``moegemm.get_num_sms()``)."""
    checks.tensor("context_lens", context_lens, (torch.int32,), 2)
    if block_kv != mqa_logits.PAGE_KEYS:
        raise ValueError(f"block_kv: expected {mqa_logits.PAGE_KEYS}, got {block_kv!r}")
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms: expected an int >= 1, got {num_sms!r}")
    if context_lens.shape[0] == 0 or context_lens.shape[1] == 0:
        return torch.zeros(num_sms + 1, 2, dtype=torch.int32, device=context_lens.device)
    return mqa_logits.paged_schedule(context_lens, num_sms)


def fp8_paged_mqa_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor, context_lens: torch.Tensor,
                         block_table: torch.Tensor, schedule_meta: torch.Tensor, max_context_len: int,
                         clean_logits: bool = False) -> torch.Tensor:
    """The lightning indexer's logits at decode over a paged cache (DeepGEMM's layout).

    Args:
        q: float8_e4m3fn ``[B, next_n, H, D]``, contiguous; on the GPU next_n 1 or 2, H 32 or 64, D 32,
            64 or 128.
        kv_cache: uint8 ``[pages, 64, 1, D + 4]``, contiguous: in each page its 64 keys' e4m3 rows, then
            their 64 float32 scales.
        weights: float32 ``[B * next_n, H]``, unit inner stride, rows 16-byte aligned.
        context_lens: int32 ``[B, next_n]``: key j is visible to token t of batch b when j <
            ``context_lens[b, t]``.
        block_table: int32 ``[B, max_blocks]``, contiguous: key j of batch b is in page
            ``block_table[b, j // 64]``.
        schedule_meta: from :func:`get_paged_mqa_logits_metadata` on the same ``context_lens``.
        max_context_len: the logits' columns.
        clean_logits: write -inf at the keys a token does not see (otherwise left unspecified).

    Returns:
        float32 ``[B * next_n, max_context_len]``, row b * next_n + t. No value is read back to the CPU
        (CUDA-graph safe). CPU tensors run the reference.
    """
    checks.is_tensor("q", q)
    return _paged_mqa_logits(q, None, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                             clean_logits)


def _paged_mqa_logits(q, q_sf, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                      clean_logits) -> torch.Tensor:
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, int) or max_context_len < 0:
        raise ValueError(f"max_context_len: expected an int >= 0, got {max_context_len!r}")
    checks.dims("q" if q_sf is None else "q[0]", q, 4)
    logits = torch.empty(q.shape[0] * q.shape[1], max_context_len, dtype=torch.float32, device=q.device)
    _PAGED_MQA_LOGITS(q, q_sf, kv_cache, weights, context_lens, block_table, schedule_meta, logits,
                      bool(clean_logits))
    return logits


def fp8_fp4_paged_mqa_logits(q: tuple[torch.Tensor, torch.Tensor | None], kv_cache: torch.Tensor,
                             weights: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                             schedule_meta: torch.Tensor, max_context_len: int,
                             clean_logits: bool = False) -> torch.Tensor:
    """:func:`fp8_paged_mqa_logits` on FP4 inputs (DeepGEMM's ``fp8_fp4_paged_mqa_logits``), widened to
    FP8 on the chip; FP8 inputs as ``(q, None)`` run :func:`fp8_paged_mqa_logits`.

    Args:
        q: ``(int8 [B, next_n, H, D/2], int32 [B, next_n, H])``: e2m1 codes and each row's packed 1x32
            UE8M0 scales, as :func:`fp8_fp4_mqa_logits` takes them; or ``(float8_e4m3fn [B, next_n, H,
            D], None)``.
        kv_cache: with FP4 q, uint8 ``[pages, 64, 1, D/2 + 4]``, contiguous: in each page its 64 keys'
            packed e2m1 rows, then their 64 int32 words of packed scales (DeepGEMM's FP4 cache); with
            FP8 q, :func:`fp8_paged_mqa_logits`'s cache.
        weights, context_lens, block_table, schedule_meta, max_context_len, clean_logits: as
            :func:`fp8_paged_mqa_logits`.

    Returns:
        float32 ``[B * next_n, max_context_len]``, the logits of the dequantised inputs. CUDA-graph
        safe; CPU tensors run the reference.
    """
    q_values, q_sf = _q_pair(q)
    return _paged_mqa_logits(q_values, q_sf, kv_cache, weights, context_lens, block_table, schedule_meta,
                             max_context_len, clean_logits)
