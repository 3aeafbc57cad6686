"""The public operations by family (``fp8_gemm``), all run through one dispatch path (``dispatch``):
arguments checked once per call signature, then a bound call that launches the kernel (CUDA) or
runs the reference (CPU)."""
