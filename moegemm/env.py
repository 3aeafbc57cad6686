"""Every environment variable moegemm reads, declared in one place.

README.md has one row per entry of ``VARIABLES``; a test keeps the two in step. The JIT reads its
variables on each compile, so they can change at run time; the launch path reads none: the settings
it needs (PDL, group checks) are read once and then changed with their setters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    doc: str


VARIABLES: tuple[Variable, ...] = (
    Variable("MOEGEMM_CACHE_DIR", "~/.cache/moegemm", "Directory of the on-disk kernel cache."),
    Variable("MOEGEMM_NVCC", "", "Path of the nvcc to use; otherwise CUDA_HOME, PATH, then the "
             "nvidia-cuda-nvcc package are searched."),
    Variable("MOEGEMM_USE_NVRTC", "0", "1: compile kernels with NVRTC instead of nvcc."),
    Variable("MOEGEMM_HOST_CC", "", "C compiler for the small host launch helper (default: cc, gcc)."),
    Variable("MOEGEMM_NVCC_FLAGS", "", "Extra flags appended to every kernel compile."),
    Variable("MOEGEMM_JIT_DEBUG", "0", "1: log every compile and cache lookup, compile with -lineinfo."),
    Variable("MOEGEMM_CHECK_GROUPS", "0", "1: the grouped GEMMs read their layout / masked_m on the host "
             "before each launch (a synchronisation) and raise on values the kernels would treat as padding "
             "or clamp (default of `set_check_groups`; read at the first grouped call)."),
    Variable("MOEGEMM_ENABLE_PDL", "0", "1: launch GEMM kernels with programmatic dependent launch "
             "(default of `set_pdl`; read at the first GEMM call)."),
    Variable("MOEGEMM_FUSED_MOE", "0", "1: `fp8_fp4_mega_moe` on one GPU runs the whole layer as one fused "
             "kernel instead of the unfused pipeline (not yet run on a GPU; read at the first call)."),
    Variable("MOEGEMM_PRINT_CONFIGS", "0", "1: print the config the heuristic picks for each new shape."),
    Variable("MOEGEMM_PTXAS_VERBOSE", "0", "1: print ptxas' resource report (registers, spills) of "
             "each compile."),
    Variable("MOEGEMM_DUMP_SASS", "0", "1: write the SASS of each compiled kernel next to its cubin "
             "(kernel.sass) and print the path."),
)

_BY_NAME = {v.name: v for v in VARIABLES}


def get(name: str) -> str:
    """The variable's value, or its declared default when it is unset or blank (an empty
    MOEGEMM_CACHE_DIR must not turn into the current directory)."""
    value = os.environ.get(name, "")
    return value if value.strip() else _BY_NAME[name].default


def flag(name: str) -> bool:
    """True when the variable is set to a true-looking value (1, true, yes, on)."""
    return get(name).strip().lower() in ("1", "true", "yes", "on")


class Toggle:
    """A process-wide on/off setting whose default is a variable's flag, read at first use (not on
    every call: the launch path reads no environment)."""

    def __init__(self, variable: str):
        self.variable = variable
        self._value: bool | None = None

    def set(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled: expected a bool, got {enabled!r}")
        self._value = enabled

    def get(self) -> bool:
        if self._value is None:
            self._value = flag(self.variable)
        return self._value
