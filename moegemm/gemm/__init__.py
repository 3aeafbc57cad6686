"""The host GEMM layer shared by every GEMM family: what a GEMM is (``desc``) and how a config is
chosen for it (``heuristic``). A family (``moegemm.kernels.fp8_gemm``) adds its tile space, its cost
terms, its code generation and its launch record."""
