"""CUDA dequant-GEMM kernels for packed GPTQ weights (issue 5; none ship yet).

Nothing here is compiled or loaded at import time.
"""
