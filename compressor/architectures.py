"""The one table of supported architectures.

Every layer-wise algorithm sees a model through an `Architecture`: where the decoder blocks are,
and which linears inside a block run in which order. `linear_groups` lists the linears of one
block in execution order; the linears in one group read the same input (q/k/v all read the
normed hidden state), so the engine gathers one set of input statistics per group.

To add an architecture whose blocks look like Llama's (same module names), add its
`config.model_type` to `ARCHITECTURES` pointing at `LLAMA_LIKE`. For different names, write a
new `Architecture` with its paths and groups, add a tiny-config test in tests/test_architectures.py,
and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from compressor.errors import UserError


@dataclass(frozen=True)
class Architecture:
    name: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    embeddings: str
    final_norm: str
    lm_head: str
    linear_groups: tuple[tuple[str, ...], ...]  # per block, in execution order; a group shares its input
    # Structured pruning (compressor/structured.py) slices these; the defaults are Llama's layout.
    attention: str = "self_attn"  # block-relative path of the attention module (holds `layer_idx`)
    attention_projections: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")  # in `attention`
    mlp: str = "mlp"  # block-relative path of the gated MLP
    mlp_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # in `mlp`
    # The CPU decode step (compressor/serve/cpu_step.py) reads these RMSNorm weights.
    block_norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
    # GGUF export (compressor/export/gguf.py): llama.cpp's architecture name, and whether its graph
    # rotates interleaved pairs (llama) where transformers rotates halves, so that q/k rows are permuted.
    gguf_arch: str = "llama"
    gguf_permute_qk: bool = True

    def block_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Relative name -> Linear for every linear the table knows, in execution order."""
        return {name: block.get_submodule(name) for group in self.linear_groups for name in group}

    def layer_in_features(self, model: nn.Module) -> dict[str, int]:
        """Full module name -> input width, for every block linear (recipe checks use this)."""
        widths = {}
        for i, block in enumerate(self.block_list(model)):
            for name, linear in self.block_linears(block).items():
                widths[f"{self.blocks}.{i}.{name}"] = linear.in_features
        return widths


LLAMA_LIKE = Architecture(
    name="llama-like",
    blocks="model.layers",
    embeddings="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
)

# config.model_type -> Architecture. SmolLM/SmolLM2 are model_type "llama".
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    # q/k/v carry biases; the engine and export handle biases generically
    "qwen2": replace(LLAMA_LIKE, gguf_arch="qwen2", gguf_permute_qk=False),
    # adds q_norm/k_norm inside attention, linears unchanged
    "qwen3": replace(LLAMA_LIKE, gguf_arch="qwen3", gguf_permute_qk=False),
}


def architecture_of(model_or_config) -> Architecture:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"model.source: architecture {model_type!r} is not supported yet; supported: "
            f"{', '.join(sorted(ARCHITECTURES))} (see compressor/architectures.py to add one)"
        )
    return ARCHITECTURES[model_type]
