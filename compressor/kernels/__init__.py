"""Dequant-GEMM kernels for GPTQ v1 weights (4- and 8-bit), used by QuantLinear on CUDA and on CPUs.

The C and CUDA sources live in the repository's top-level kernels/ folder (installed as the data
folder compressor/kernels/csrc); the Python that builds, loads and calls them lives here:

    build.py       nvcc / the C compiler -> cached shared libraries, loaded with ctypes on first use
    repack.py      CUDA: load-time repack into the kernels' tile layout; CPU emulator of the kernels
    ops.py         CUDA: the torch-facing op (`linear`), M-based dispatch, the QuantLinear hook
    cpu.py         CPU: the QuantLinear hook, fused q/k/v and gate/up, the float16-weight linear

    kernels/common.h, gemv.cu (M <= 8), mma.cu (tensor cores, M > 8): the CUDA kernels, layout in common.h
    kernels/cpu_gemm.c    CPU: AVX2 kernels reading GPTQ v1 buffers as stored (layout and tricks at its top)
    kernels/cpu_decode.c  CPU: the operations between a Llama block's matmuls (norm, rotary + KV-cache
                          write, attention, silu), for compressor/serve/cpu_step.py

kernels/ holds no Python on purpose: a Python package named `kernels` at the repository root would
shadow Hugging Face's `kernels` library (a dependency of transformers >= 5.25) whenever the root is
on sys.path (`python -m pytest`, a REPL in the checkout), and break `import transformers`.

Nothing here is compiled or loaded at import time.
"""
