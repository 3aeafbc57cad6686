"""FP8 casts: the SM90 kernel (moegemm.kernels.fp8_cast) against the PyTorch path of moegemm.utils bit for
bit (GPU), and every kernel variant compiled without spills plus the host-side logic (CPU)."""

from __future__ import annotations

import concurrent.futures
import os
import re

import pytest
import torch

import moegemm
from moegemm import intmath, quant
from moegemm.jit import compiler
from moegemm.jit.compiler import CompileError
from moegemm.kernels import fp8_cast
from moegemm.kernels.fp8_cast import Fp8CastConfig

gpu = pytest.mark.gpu
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# kind -> (kernel launcher, torch reference)
KINDS = {
    "per_token": (fp8_cast.per_token_cast, quant._per_token_cast_torch),
    "per_block": (fp8_cast.per_block_cast, quant._per_block_cast_torch),
}


def make_x(m: int, k: int, dtype: torch.dtype, dist: str = "normal", scale: float = 1.0,
           device: str = "cuda") -> torch.Tensor:
    x = torch.randn(m, k, device=device)
    if dist == "wide":
        # Magnitudes over 2**-14 .. 2**14 inside every block: FP8 subnormals and zeros next to the amax.
        x *= torch.exp2(torch.randint(-14, 15, (m, k), device=device).float())
    return (x * scale).to(dtype)


def _first_mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    bad = (a != b).nonzero()
    index = tuple(bad[0].tolist())
    return f"{len(bad)} of {a.numel()} differ, first at {index}: {a[index].item():#x} vs {b[index].item():#x}"


def assert_same(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, sf), (q_ref, sf_ref) = out, ref
    assert q.dtype == torch.float8_e4m3fn and sf.dtype == torch.float32
    assert q.shape == q_ref.shape and sf.shape == sf_ref.shape, (q.shape, q_ref.shape, sf.shape, sf_ref.shape)
    assert q.is_contiguous() and sf.stride() == sf_ref.stride(), (sf.stride(), sf_ref.stride())
    sf_bits, sf_ref_bits = sf.view(torch.int32).cpu(), sf_ref.view(torch.int32).cpu()
    assert torch.equal(sf_bits, sf_ref_bits), "sf: " + _first_mismatch(sf_bits, sf_ref_bits)
    q_bits, q_ref_bits = q.view(torch.uint8).cpu(), q_ref.view(torch.uint8).cpu()
    assert torch.equal(q_bits, q_ref_bits), "x_fp8: " + _first_mismatch(q_bits, q_ref_bits)


def check(kind: str, x: torch.Tensor, ue8m0: bool) -> None:
    launch, reference = KINDS[kind]
    assert_same(launch(x, ue8m0), reference(x, ue8m0))


# ---- GPU: the kernel against the torch path -------------------------------------------------------------

SHAPES = [(1, 128), (1, 7168), (2, 16), (7, 200), (128, 128), (129, 200), (129, 7168), (300, 1000),
          (1000, 2112), (4096, 7168)]


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_sf", "ue8m0"])
@pytest.mark.parametrize("m,k", SHAPES)
def test_matches_torch(kind, dtype, ue8m0, m, k, seed):
    for dist in ("normal", "wide"):
        x = make_x(m, k, DTYPES[dtype], dist)
        assert fp8_cast.plan(x, ue8m0, kind == "per_block").config.aligned
        check(kind, x, ue8m0)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-30, 1e-7, 3e4, 1e30])
def test_extreme_magnitudes(kind, dtype, scale, seed):
    # Tiny blocks take the 1e-4 amax floor; huge ones give huge scales.
    x = make_x(130, 384, DTYPES[dtype], "wide", scale)
    for ue8m0 in (False, True):
        check(kind, x, ue8m0)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_sf", "ue8m0"])
def test_zero_and_tiny_blocks(kind, dtype, ue8m0, seed):
    x = make_x(300, 520, DTYPES[dtype])
    x[3] = 0  # a zero row
    x[5] = -0.0
    x[130:140] *= 1e-7  # rows below the amax floor
    x[:, 384:] = 0  # a zero ragged last block (K = 520: blocks of 128, 128, 128, 128, 8)
    x[256:, 128:256] = 0  # a zero 128x128 tile, ragged in M (rows 256..299)
    check(kind, x, ue8m0)
    check(kind, torch.zeros_like(x), ue8m0)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_pitch(kind, dtype, seed):
    wide = make_x(257, 7168 + 256, DTYPES[dtype], "wide")
    for x in (wide[:, :7168], wide[:, 128:128 + 1000], wide[::2, :200], wide[:, :7168 + 8]):
        assert fp8_cast.plan(x, False, kind == "per_block").config.aligned
        for ue8m0 in (False, True):
            check(kind, x, ue8m0)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unaligned_inputs(kind, dtype, seed):
    """Shapes and views the 16-byte path cannot read go through the element-wise path."""
    dt = DTYPES[dtype]
    wide = make_x(260, 7168 + 3, dt)
    cases = [
        make_x(5, 1, dt), make_x(129, 13, dt), make_x(131, 130, dt), make_x(3, 1001, dt),  # K % 8 (4) != 0
        wide[:, :7168],  # row pitch not a multiple of 16 bytes
        wide[:, 1:1 + 7168 - 16],  # base not 16-byte aligned
        wide[:, 3:3 + 200],
    ]
    for x in cases:
        assert not fp8_cast.plan(x, False, kind == "per_block").config.aligned, tuple(x.shape)
        for ue8m0 in (False, True):
            check(kind, x, ue8m0)


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32_sf", "ue8m0"])
@pytest.mark.parametrize("m,k,aligned", [(129, 7168, True), (300, 200, True), (77, 1001, False)])
def test_every_output_byte_written(kind, dtype, ue8m0, m, k, aligned, seed):
    x = make_x(m, k, DTYPES[dtype], "wide")
    plan = fp8_cast.plan(x, ue8m0, kind == "per_block")
    assert plan.config.aligned == aligned
    ref = KINDS[kind][1](x, ue8m0)
    # 0xFF is NaN both as e4m3 and (four of them) as float32: any byte left unwritten shows.
    buffer = torch.full((plan.geometry.buffer_bytes,), 0xFF, dtype=torch.uint8, device="cuda")
    assert_same(plan.run(x, buffer), ref)
    # The default path, after freeing a poisoned block of the same size for the allocator to hand out again.
    del buffer
    torch.full((plan.geometry.buffer_bytes,), 0xFF, dtype=torch.uint8, device="cuda")
    assert_same(KINDS[kind][0](x, ue8m0), ref)


@gpu
@pytest.mark.parametrize("kind", KINDS)
def test_matches_cpu_reference(kind, seed):
    for dtype in DTYPES.values():
        x = make_x(257, 456, dtype, "wide")
        for ue8m0 in (False, True):
            assert_same(KINDS[kind][0](x, ue8m0), KINDS[kind][1](x.cpu(), ue8m0))


@gpu
def test_public_functions_dispatch(seed):
    x = make_x(200, 640, torch.bfloat16)
    assert quant._use_cast_kernel(x)
    for public, kind in ((moegemm.per_token_cast_to_fp8, "per_token"), (moegemm.per_block_cast_to_fp8, "per_block")):
        for ue8m0 in (False, True):
            assert_same(public(x, ue8m0), KINDS[kind][1](x, ue8m0))
            assert_same(public(x, use_ue8m0=ue8m0), KINDS[kind][1](x, ue8m0))
    # Inputs the kernel does not take still work, through torch.
    for other in (x.view(2, 100, 640), x.half(), x.t()):
        assert not quant._use_cast_kernel(other)
        q, sf = moegemm.per_token_cast_to_fp8(other)
        assert q.shape == other.shape


@gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,k", [(0, 256), (5, 0), (0, 0)])
def test_empty(kind, m, k):
    x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
    q, sf = KINDS[kind][0](x, False)
    q_ref, sf_ref = KINDS[kind][1](x, False)
    assert q.shape == q_ref.shape and sf.shape == sf_ref.shape


@gpu
def test_cuda_graph_and_side_stream(seed):
    x = make_x(1000, 7168, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fp8_cast.per_token_cast(x, False)
    torch.cuda.current_stream().wait_stream(stream)
    assert_same(out, quant._per_token_cast_torch(x, False))

    # Compile, load and plan outside the capture (as any warm-up before capturing does).
    fp8_cast.per_token_cast(x, True)
    fp8_cast.per_block_cast(x, False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token = fp8_cast.per_token_cast(x, True)
        block = fp8_cast.per_block_cast(x, False)
    for _ in range(2):
        x.copy_(make_x(1000, 7168, torch.bfloat16, "wide"))
        graph.replay()
        torch.cuda.synchronize()
        assert_same(token, quant._per_token_cast_torch(x, True))
        assert_same(block, quant._per_block_cast_torch(x, False))


# ---- CPU: every variant compiles cleanly ----------------------------------------------------------------


def _missing_sass_tools() -> str | None:
    try:
        compiler.find_nvcc()
    except CompileError as error:
        return f"nvcc not found: {error}"
    if compiler.find_cuobjdump() is None:
        return "cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
    return None


_LOCAL_MEMORY = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?(LDL|STL)\b", re.M)


def _compile_and_inspect(config: Fp8CastConfig) -> tuple[compiler.ResourceReport, str]:
    build = fp8_cast.build(config)
    return build.resources(), compiler.disassemble(build.cubin_path)


@pytest.fixture(scope="module")
def compiled_variants(tmp_path_factory) -> dict:
    """Every variant compiled and disassembled once, in parallel, into a cache of this module's own.
    A failure is kept and raised by its own test."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOEGEMM_CACHE_DIR", str(tmp_path_factory.mktemp("fp8-cast-cache")))
        for name in ("MOEGEMM_NVCC_FLAGS", "MOEGEMM_USE_NVRTC", "MOEGEMM_JIT_DEBUG", "MOEGEMM_PTXAS_VERBOSE",
                     "MOEGEMM_DUMP_SASS"):
            patch.delenv(name, raising=False)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            futures = {c: pool.submit(_compile_and_inspect, c) for c in fp8_cast.all_configs()}
            return {c: f.exception() or f.result() for c, f in futures.items()}


@pytest.mark.skipif(_missing_sass_tools() is not None, reason=str(_missing_sass_tools()))
@pytest.mark.parametrize("config", fp8_cast.all_configs(), ids=fp8_cast.kernel_name)
def test_variant_compiles_without_spills(compiled_variants, config):
    outcome = compiled_variants[config]
    if isinstance(outcome, BaseException):
        raise outcome
    report, sass = outcome
    assert (report.spill_stores, report.spill_loads, report.stack_bytes) == (0, 0, 0), report
    assert _LOCAL_MEMORY.findall(sass) == [], "local-memory traffic in the SASS"
    # Registers for the 1024 resident threads per SM the launch bounds ask for.
    assert report.registers <= 64, report
    assert "F2FP.SATFINITE.E4M3" in sass, "no e4m3 conversion in the SASS"
    assert "FMNMX.NAN" in sass, "amax must propagate NaN"
    if config.aligned:
        assert re.search(r"LDG\.E\.\S*128", sass), "no 16-byte loads in the SASS of the aligned path"
    else:
        assert not re.search(r"LDG\.E\.\S*128", sass)


# ---- CPU: host-side logic --------------------------------------------------------------------------------


def test_all_configs_distinct_names():
    configs = fp8_cast.all_configs()
    assert len(configs) == 16
    assert len({fp8_cast.kernel_name(c) for c in configs}) == 16


@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("input_bytes", [2, 4])
@pytest.mark.parametrize("m,k", [(1, 1), (1, 128), (129, 200), (4096, 7168), (300, 1001)])
def test_geometry(per_block, input_bytes, m, k):
    config = Fp8CastConfig(input_bytes, False, per_block, True)
    g = fp8_cast.geometry(config, m, k, k + 8)
    k_blocks = -(-k // 128)
    sf_rows = -(-m // 128) if per_block else m
    assert g.sf_shape == (sf_rows, k_blocks)
    assert g.sf_offset % 16 == 0 and m * k <= g.sf_offset < m * k + 16
    # Per token, the scales' columns are M-major and 16-byte aligned, as the GEMMs read them.
    sf_ld = intmath.get_tma_aligned_size(m, 4)
    assert g.sf_strides == ((k_blocks, 1) if per_block else (1, sf_ld))
    assert g.buffer_bytes == g.sf_offset + 4 * (sf_rows if per_block else sf_ld) * k_blocks
    # One CTA per 128x128 tile, or per token one per rectangle of cta_rows x 4 blocks.
    if per_block:
        assert g.grid == sf_rows * k_blocks
    else:
        assert g.grid == -(-m // config.cta_rows) * -(-k_blocks // 4)
    assert g.values == dict(x_pitch=k + 8, sf_offset=g.sf_offset, m=m, k=k, num_k_blocks=k_blocks,
                            num_units=sf_rows * k_blocks)


def test_config_constants():
    # Mirrors of the device constants (the generated stub static_asserts them too).
    assert Fp8CastConfig(2, False, False, True).units_per_cta == 64  # 8 warps x 2 block rows x 4
    assert Fp8CastConfig(4, False, False, True).units_per_cta == 32  # 8 warps x 1 block row x 4
    assert Fp8CastConfig(2, False, False, True).cta_rows == 16
    assert Fp8CastConfig(2, True, True, False).num_threads == 512
    assert Fp8CastConfig(4, False, True, True).units_per_cta == 1
    source = fp8_cast.generate_source(Fp8CastConfig(2, True, False, False))
    assert "Fp8CastConfig<2, true, false, false>" in source


def test_geometry_rejects_huge_problems():
    config = Fp8CastConfig(2, False, False, True)
    with pytest.raises(ValueError, match="too large"):
        fp8_cast.geometry(config, 2**24, 2**17, 2**17)


def test_is_aligned():
    assert fp8_cast.is_aligned(torch.empty(4, 200, dtype=torch.bfloat16))
    assert fp8_cast.is_aligned(torch.empty(4, 100, dtype=torch.float32))
    assert not fp8_cast.is_aligned(torch.empty(4, 100, dtype=torch.bfloat16))  # K % 8 != 0
    assert fp8_cast.is_aligned(torch.empty(4, 264, dtype=torch.bfloat16)[:, 8:])  # base + 16 bytes
    assert not fp8_cast.is_aligned(torch.empty(4, 263, dtype=torch.bfloat16)[:, :256])  # pitch 526 bytes
    assert not fp8_cast.is_aligned(torch.empty(4, 264, dtype=torch.bfloat16)[:, 1:257])  # base + 2 bytes
    assert fp8_cast.is_aligned(torch.empty(1, 264, dtype=torch.bfloat16)[:, :256])


def test_cpu_inputs_take_the_torch_path(seed):
    for dtype in DTYPES.values():
        x = make_x(130, 300, dtype, "wide", device="cpu")
        assert not quant._use_cast_kernel(x)
        for ue8m0 in (False, True):
            assert_same(moegemm.per_token_cast_to_fp8(x, ue8m0), quant._per_token_cast_torch(x, ue8m0))
            assert_same(moegemm.per_block_cast_to_fp8(x, ue8m0), quant._per_block_cast_torch(x, ue8m0))


def test_launcher_rejects_what_it_cannot_cast():
    with pytest.raises(ValueError, match="x: expected a 2-D bf16 or fp32 CUDA tensor"):
        fp8_cast.per_token_cast(torch.zeros(4, 128))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        fp8_cast.per_block_cast(torch.zeros(2, 4, 128))
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        fp8_cast.per_block_cast([[1.0]])
