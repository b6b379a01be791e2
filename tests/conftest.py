"""Shared fixtures: a tiny random Llama (seconds) and the real SmolLM2 tokenizer.

The tiny model uses SmolLM2's tokenizer (vocab 49152) so the text pipeline is the real one;
its widths (64 hidden, 128 intermediate) admit every bit width's packing and group size 32.
"""

from __future__ import annotations

import pytest
import torch

from compressor.models import load_tokenizer, resolve_source


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_tokenizer(resolve_source("smollm2-135m"))


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A Hugging Face directory holding a tiny random Llama and SmolLM2's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_llama()
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
