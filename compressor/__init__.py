"""compressor: compress open LLMs into serving-ready artifacts.

`compress run recipe.yaml` is the main entry point; the pieces are importable:
`compressor.quantize.quantize_`, `compressor.algorithms.gptq.gptq_quantize`,
`compressor.runtime.load`, `compressor.evaluation.perplexity.perplexity`.
"""

__version__ = "0.1.0"
