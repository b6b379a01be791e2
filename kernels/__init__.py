"""CUDA dequant-GEMM kernels for GPTQ v1 weights (4- and 8-bit), used by QuantLinear on CUDA.

    build.py   nvcc -> cached shared library, loaded with ctypes on first use
    repack.py  load-time repack into the kernels' tile layout; CPU emulator of the kernels
    ops.py     the torch-facing op (`linear`), M-based dispatch, the QuantLinear hook
    common.h, gemv.cu (M <= 8), mma.cu (tensor cores, M > 8): the kernels, layout in common.h

Nothing here is compiled or loaded at import time.
"""
