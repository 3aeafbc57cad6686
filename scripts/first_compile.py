"""Wall time of the first call of a new fp8_gemm_nt config (compile + load + run) and of a cached call
in a fresh process, with an empty cache; run by scripts/device_run.sh."""

import os
import subprocess
import sys
import time

import torch

import moegemm


def first_call_seconds() -> float:
    a = moegemm.per_token_cast_to_fp8(torch.randn(256, 1024, device="cuda"))
    b = moegemm.per_block_cast_to_fp8(torch.randn(512, 1024, device="cuda"))
    d = torch.empty(256, 512, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    moegemm.fp8_gemm_nt(a, b, d)
    torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(f"{first_call_seconds():.3f}")
    else:
        for label, extra in (("nvcc, empty cache", {}), ("nvcc, cached", {}),
                             ("NVRTC, empty cache", {"MOEGEMM_USE_NVRTC": "1"})):
            env = dict(os.environ, **extra)
            result = subprocess.run([sys.executable, __file__, "child"], env=env, capture_output=True, text=True)
            print(f"first fp8_gemm_nt call ({label}): {result.stdout.strip() or result.stderr[-2000:]} s")
