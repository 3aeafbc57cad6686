"""Every config of the FP8, FP8 x FP4 and BF16 GEMMs the heuristics emit, or a GPU test forces, and of
the hyper-connection GEMM compiles for sm_90a with no local-memory spills, with the family's WGMMA in its
SASS (QGMMA for FP8, HGMMA for BF16 and TF32), and with no WGMMA serialized by ptxas. CPU only;
skipped without nvcc and cuobjdump."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import COMPILE_VARIABLES, H100, needs_sass_tools

from moegemm.gemm.desc import GemmDesc, GemmType, Major
from moegemm.jit import compiler
from moegemm.kernels import bf16_gemm, fp8_fp4_gemm, fp8_gemm, hc_prenorm


def _fp8_configs() -> list:
    grid = set()
    for m in (1, 64, 128, 129, 1000, 4096, 16384):
        for n in (8, 16, 24, 48, 64, 136, 256, 576, 1000, 2112, 4096, 7168, 16384, 24576, 32768):
            for k in (128, 512, 7168):
                for out_fp32, accumulate in ((False, False), (True, False), (True, True)):
                    out_dtype = torch.float32 if out_fp32 else torch.bfloat16
                    desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=out_dtype, accumulate=accumulate)
                    grid.add(fp8_gemm.select_config(desc, H100))
    # The 1D1D recipe (weight gradients): FP32 accumulated into D.
    for m, n, k in ((7168, 2112, 4096), (1536, 24576, 4096), (4096, 7168, 16384), (1, 256, 512), (129, 136, 7168)):
        desc = GemmDesc(GemmType.NORMAL, m, n, k, out_dtype=torch.float32, accumulate=True, recipe=(1, 1, 128))
        grid.add(fp8_gemm.select_config(desc, H100))
    for groups, m, n, k in ((8, 4096, 7168, 5008), (16, 7168, 2048, 4616), (4, 128, 256, 256)):
        desc = GemmDesc(GemmType.K_GROUPED, m, n, k, groups, out_dtype=torch.float32, accumulate=True,
                        recipe=(1, 1, 128))
        grid.add(fp8_gemm.select_config(desc, H100))
    for kind in (GemmType.CONTIGUOUS, GemmType.PSUM, GemmType.MASKED):
        for m, groups in ((1, 32), (32, 32), (160, 32), (256, 32), (4096, 8), (8192, 4)):
            for n, k in ((4096, 7168), (7168, 2048), (576, 512)):
                grid.add(fp8_gemm.select_config(GemmDesc(kind, m, n, k, groups), H100))
    # fp8_einsum's per-head products (B x H x R x D as M, groups, K, N), BF16 out or FP32 accumulated.
    for m, heads, k, n in ((4, 8, 4096, 1024), (128, 8, 4096, 1024), (4096, 8, 4096, 1024), (4096, 128, 512, 128)):
        for out_dtype, accumulate in ((torch.bfloat16, False), (torch.float32, True)):
            desc = GemmDesc(GemmType.BATCHED, m, n, k, heads, out_dtype=out_dtype, accumulate=accumulate)
            grid.add(fp8_gemm.select_config(desc, H100))
    return sorted(grid | set(_explicit_configs()), key=fp8_gemm.kernel_name)


def _bf16_configs() -> list:
    grid = set()
    for major_a, major_b in ((Major.K, Major.K), (Major.K, Major.MN), (Major.MN, Major.MN), (Major.MN, Major.K)):
        for m in (1, 128, 1000, 4096):
            for n in (16, 576, 2112, 7168):
                for k in (64, 7168):
                    for out_dtype, accumulate in ((torch.bfloat16, False), (torch.float32, True)):
                        desc = GemmDesc(GemmType.NORMAL, m, n, k, ab_dtype=torch.bfloat16, out_dtype=out_dtype,
                                        accumulate=accumulate)
                        grid.add(bf16_gemm.select_config(desc, H100, major_a, major_b))
    for kind, major_b in ((GemmType.CONTIGUOUS, Major.K), (GemmType.PSUM, Major.MN), (GemmType.MASKED, Major.K)):
        for m, groups in ((1, 32), (160, 32), (256, 32), (4096, 8)):
            for n, k in ((4096, 7168), (7168, 2048)):
                desc = GemmDesc(kind, m, n, k, groups, ab_dtype=torch.bfloat16)
                grid.add(bf16_gemm.select_config(desc, H100, Major.K, major_b))
    for groups, m, n, k in ((4, 4096, 7168, 8192), (4, 7168, 2048, 8192), (16, 4096, 7168, 2048), (8, 128, 256, 512)):
        desc = GemmDesc(GemmType.K_GROUPED, m, n, k, groups, ab_dtype=torch.bfloat16, out_dtype=torch.float32,
                        accumulate=True)
        grid.add(bf16_gemm.select_config(desc, H100, Major.MN, Major.MN))
    # The einsum forms: per-head products (B K-major or MN-major), and the batch sum.
    for kind, m, n, k, groups, major_b in ((GemmType.BATCHED, 4096, 128, 512, 128, Major.K),
                                           (GemmType.BATCHED, 32, 4096, 1024, 8, Major.K),
                                           (GemmType.BATCHED, 4096, 512, 128, 128, Major.MN),
                                           (GemmType.BATCH_SUM, 384, 384, 256, 8192, Major.K)):
        out_dtype = torch.float32 if kind is GemmType.BATCH_SUM else torch.bfloat16
        desc = GemmDesc(kind, m, n, k, groups, ab_dtype=torch.bfloat16, out_dtype=out_dtype,
                        accumulate=kind is GemmType.BATCH_SUM)
        grid.add(bf16_gemm.select_config(desc, H100, Major.K, major_b))
    return sorted(grid, key=bf16_gemm.kernel_name)


def _hc_prenorm_configs() -> list:
    return [hc_prenorm.select_config(n, H100) for n in (8, 24, 64, 256)]


def _fp8_fp4_configs() -> list:
    """The FP8 x FP4 configs of the heuristics (dense and grouped, both kernels) and of the GPU tests."""
    tests = _test_module("test_fp8_fp4_gemm")
    grid = set(tests.CONFIGS) | set(tests.SWAP_AB_CONFIGS)
    for kind in (GemmType.CONTIGUOUS, GemmType.MASKED):
        for m, groups in ((32, 32), (256, 8), (4096, 8)):
            for n, k in ((4096, 7168), (7168, 2048), (576, 512), (264, 224)):
                grid.add(fp8_fp4_gemm.select_config(GemmDesc(kind, m, n, k, groups), H100))
    for kind, groups in ((GemmType.NORMAL, 1), (GemmType.MASKED, 32)):
        for m in (1, 16, 48, 64, 128):
            for n, k in ((2112, 7168), (7168, 16384), (24576, 1536), (4096, 7168), (576, 512)):
                for out_dtype, accumulate in ((torch.bfloat16, False), (torch.float32, kind is GemmType.NORMAL)):
                    desc = GemmDesc(kind, m, n, k, groups, out_dtype=out_dtype, accumulate=accumulate)
                    config = fp8_fp4_gemm.select_swap_ab(desc, H100)
                    if config is not None:
                        grid.add(config)
    return sorted(grid, key=fp8_fp4_gemm.kernel_name)


def _family(config):
    """(Host module, WGMMA opcode) of a config's family."""
    if isinstance(config, hc_prenorm.HcPrenormConfig):
        return hc_prenorm, "HGMMA"
    if isinstance(config, (fp8_fp4_gemm.Fp8Fp4GemmConfig, fp8_fp4_gemm.SwapAbConfig)):
        return fp8_fp4_gemm, "QGMMA"
    return (bf16_gemm, "HGMMA") if isinstance(config, bf16_gemm.Bf16GemmConfig) else (fp8_gemm, "QGMMA")


def _kernel_name(config) -> str:
    return _family(config)[0].kernel_name(config)


def _test_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_moegemm_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _explicit_configs() -> list:
    """The configs the GPU tests force (test_fp8_gemm.CONFIGS, WGRAD_CONFIGS and K_GROUPED_CONFIGS,
    test_fp8_grouped_gemm.EVERY_CONFIG): they must compile too."""
    grouped_tests = _test_module("test_fp8_grouped_gemm")
    grouped = [dataclasses.replace(config, gemm_type=grouped_tests.KINDS[kind])
               for config, kind in grouped_tests.EVERY_CONFIG]
    dense_tests = _test_module("test_fp8_gemm")
    return dense_tests.CONFIGS + dense_tests.WGRAD_CONFIGS + dense_tests.K_GROUPED_CONFIGS + grouped


ALL_CONFIGS = _fp8_configs() + _bf16_configs() + _hc_prenorm_configs() + _fp8_fp4_configs()

_SPILLS = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(LDL|STL)\b", re.M)


# ptxas' notes that it serialized WGMMAs or inserted waits for them: each costs the overlap of tensor
# cores with everything else.
_WGMMA_SERIALIZED = re.compile(r"\((C751[0-9])\)[^\n]*")


def _compile_and_inspect(config) -> tuple[compiler.ResourceReport, int, list[str], list[str]]:
    module, opcode = _family(config)
    build = module.build(config)
    sass = compiler.disassemble(build.cubin_path)
    serialized = [m.group(0) for m in _WGMMA_SERIALIZED.finditer(build.log)]
    return (build.resources(), sass.count(opcode), [m.group(0).strip() for m in _SPILLS.finditer(sass)],
            serialized)


@pytest.fixture(scope="module")
def compiled_configs(tmp_path_factory) -> dict:
    """Every config compiled and disassembled once, in parallel (nvcc runs outside the GIL), into a
    cache shared by this module's config tests. A failure is kept and raised by its own test."""
    configs = ALL_CONFIGS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOEGEMM_CACHE_DIR", str(tmp_path_factory.mktemp("config-cache")))
        for name in COMPILE_VARIABLES:
            patch.delenv(name, raising=False)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            futures = {config: pool.submit(_compile_and_inspect, config) for config in configs}
            return {config: future.exception() or future.result() for config, future in futures.items()}


@needs_sass_tools
@pytest.mark.parametrize("config", ALL_CONFIGS, ids=_kernel_name)
def test_config_compiles_without_spills(compiled_configs, config):
    outcome = compiled_configs[config]
    if isinstance(outcome, BaseException):
        raise outcome
    report, num_wgmma, local_memory, serialized = outcome
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert num_wgmma > 0, f"no {_family(config)[1]} in the SASS"
    assert local_memory == [], "local-memory traffic in the SASS"
    assert serialized == [], f"ptxas serialized the WGMMAs: {serialized}"


