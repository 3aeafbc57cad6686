"""The JIT runtime: compile generated CUDA sources (compiler), load and launch them (runtime)."""

from .compiler import Build, CompileError, build, cache_dir, clear_cache, disassemble
from .runtime import Kernel, LaunchError

__all__ = ["Build", "CompileError", "Kernel", "LaunchError", "build", "cache_dir", "clear_cache", "disassemble"]
