"""Kernel families: each is one CUDA header (sm90_*.cuh) and one host launcher of the same name."""
