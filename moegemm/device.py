"""The GPU the kernels run on: which GPUs qualify, the facts the config heuristics need (queried from
the driver, never tabled), and the process-wide launch settings (SM limit, programmatic dependent
launch). Importing this module never touches CUDA."""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch

from . import env

MAX_CLUSTER_SIZE = 8  # portable cluster size


class UnsupportedGPUError(RuntimeError):
    """The GPU is not one moegemm's kernels run on (they need SM90, e.g. H100 or H200)."""


@functools.cache
def _sm90_message(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) == (9, 0):
        return None
    name = torch.cuda.get_device_name(index)
    return (f"moegemm's kernels need an SM90 GPU (H100, H200, H20, H800); device {index} is {name} "
            f"with compute capability {major}.{minor}")


def require_sm90(device: torch.device) -> None:
    """Raise UnsupportedGPUError unless CUDA ``device`` is an SM90 GPU."""
    message = _sm90_message(device.index if device.index is not None else torch.cuda.current_device())
    if message:
        raise UnsupportedGPUError(message)


def is_sm90(device: torch.device) -> bool:
    return _sm90_message(device.index if device.index is not None else torch.cuda.current_device()) is None


# ---- facts for the heuristics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFacts:
    """What a config heuristic needs to know of the GPU.

    num_sms: SMs the persistent kernels may use (``set_num_sms`` applied).
    smem_per_block: dynamic shared memory one block may opt in to, bytes.
    resident_clusters: entry c - 1 is how many clusters of c CTAs (one CTA per SM, as every GEMM
        config needs) fit on the GPU at once, c = 1 .. MAX_CLUSTER_SIZE. A cluster must fit in one
        GPC, so sizes that do not divide the GPCs' SM counts leave SMs idle.
    """

    num_sms: int
    smem_per_block: int
    resident_clusters: tuple[int, ...]

    def clusters(self, size: int) -> int:
        """Clusters of ``size`` CTAs that run at once, within the SMs allowed."""
        return min(self.num_sms // size, self.resident_clusters[size - 1])


@functools.cache
def _queried_facts(index: int) -> tuple[int, int, tuple[int, ...]]:
    from .jit.runtime import max_active_clusters_per_size

    props = torch.cuda.get_device_properties(index)
    smem = props.shared_memory_per_block_optin
    return props.multi_processor_count, smem, max_active_clusters_per_size(index, smem, MAX_CLUSTER_SIZE)


def device_facts(index: int) -> DeviceFacts:
    """The facts of CUDA device ``index``, queried once per process (a tiny probe kernel tells how
    many clusters of each size are resident), with the SM limit of ``set_num_sms`` applied."""
    num_sms, smem, resident = _queried_facts(index)
    return DeviceFacts(num_sms_of(index), smem, resident)


# ---- SM count ---------------------------------------------------------------------------------------------

_num_sms_override: int | None = None


@functools.cache
def _sm_count(index: int) -> int:
    # Queried once per device: the launch path asks on every new signature.
    return torch.cuda.get_device_properties(index).multi_processor_count


def set_num_sms(n: int) -> None:
    """Limit the number of SMs the kernels use (persistent grid size).

    Raises:
        ValueError: unless ``1 <= n <= `` the current device's SM count (upper bound checked only when a
            GPU is present).
    """
    global _num_sms_override
    if isinstance(n, bool):
        raise ValueError(f"num_sms: expected an int, got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"num_sms: expected an int, got {n!r}") from None
    device_sms = _sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else None
    if n < 1 or (device_sms is not None and n > device_sms):
        raise ValueError(f"num_sms: expected an int in [1, {device_sms or 'the device SM count'}], got {n}")
    _num_sms_override = n


def num_sms_override() -> int | None:
    """The ``set_num_sms`` limit, or None: part of every launch signature."""
    return _num_sms_override


def num_sms_of(index: int) -> int:
    """SM count the kernels use on CUDA device ``index``: the :func:`set_num_sms` limit, else its SMs."""
    return _num_sms_override if _num_sms_override is not None else _sm_count(index)


def get_num_sms() -> int:
    """SM count the kernels use: the :func:`set_num_sms` limit, else the current device's SM count."""
    if _num_sms_override is not None:
        return _num_sms_override
    try:
        return _sm_count(torch.cuda.current_device())
    except (AssertionError, RuntimeError):
        raise RuntimeError("get_num_sms needs a CUDA GPU (or an explicit set_num_sms)") from None


# ---- programmatic dependent launch -----------------------------------------------------------------------

_PDL = env.Toggle("MOEGEMM_ENABLE_PDL")


def set_pdl(enabled: bool) -> None:
    """Launch the GEMM kernels with programmatic dependent launch: a kernel's blocks may start while
    the previous kernel on the stream finishes, and wait (``griddepcontrol.wait``) before touching
    memory. Hides part of the launch gap between back-to-back kernels; results are unchanged.
    Default: the ``MOEGEMM_ENABLE_PDL`` environment variable."""
    _PDL.set(enabled)


def get_pdl() -> bool:
    """Whether GEMM kernels are launched with programmatic dependent launch (see :func:`set_pdl`)."""
    return _PDL.get()
