"""Artifacts on disk, the bottom layer that writers and readers share.

    directory.py   manifest.json (sha256 of every file), all-or-nothing output directories, JSON writes
    checkpoint.py  reading a GPTQ checkpoint: its declared quantization, weight files, tensors (gptq_v2 as v1)
    formats.py     the file names that mark an ONNX or GGUF artifact, and their optional packages

compressor.export writes artifacts and compressor.runtime loads them; both import this package and
neither imports the other (tests/test_layout.py checks it).
"""
