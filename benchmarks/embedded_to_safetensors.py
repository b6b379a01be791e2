"""Save a model source (default: the embedded SmolLM2-135M GGUF, dequantized to float32 by
transformers) as a safetensors model directory, the kind of source `compute.load: blockwise` reads.

    python benchmarks/embedded_to_safetensors.py /work/scale/smollm2-st
    compress run recipes/smollm2-w4g64.yaml --set model=/work/scale/smollm2-st --set compute.load=blockwise
"""

import argparse

import torch

from compressor.models import load_model, load_tokenizer, resolve_source

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("out", help="output directory")
parser.add_argument("--source", default="smollm2-135m")
args = parser.parse_args()
source = resolve_source(args.source)
load_model(source, torch.float32).save_pretrained(args.out)
load_tokenizer(source).save_pretrained(args.out)
