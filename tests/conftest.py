"""Shared fixtures and helpers: a tiny random Llama (seconds), the real SmolLM2 tokenizer, a tiny
RTN-quantized GPTQ artifact, and the CLI runner with its one-line-error check.

The tiny model uses SmolLM2's tokenizer (vocab 49152) so the text pipeline is the real one;
its widths (64 hidden, 128 intermediate) admit every bit width's packing and group size 32.
"""

from __future__ import annotations

import pytest
import torch

from click.testing import CliRunner

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


def write_tiny_gptq_artifact(out, tokenizer, bits: int = 4, group_size: int = 32, model=None, sym: bool = True,
                             act_order: bool = False, checkpoint_format: str = "gptq"):  # fmt: skip
    """A GPTQ artifact at `out` of `model` (default: a tiny random Llama), block linears
    RTN-quantized (symmetric unless `sym` is False). `act_order` only changes what the config
    records (act-order with static groups: g_idx stays in order).

    For tests of what consumes an artifact (export, load, serve): quantization quality is not
    the point, so round-to-nearest stands in for GPTQ and costs nothing.
    """
    from compressor.algorithms.quant import rtn_quantize
    from compressor.export.gptq import gptq_quantization_config, write_gptq_checkpoint

    model = make_tiny_llama(initializer_range=0.3) if model is None else model
    quantized = {}
    for name, linear in model.named_modules():
        if isinstance(linear, torch.nn.Linear) and ".layers." in name:
            quantized[name] = rtn_quantize(linear.weight, bits, group_size, sym)
            linear.weight.data = quantized[name].dequantize()
    out.mkdir(parents=True)
    config = gptq_quantization_config(bits, group_size, sym, act_order, act_order, 0.01, True, checkpoint_format=checkpoint_format)
    write_gptq_checkpoint(out, model, quantized, config, tokenizer=tokenizer)
    return out


def invoke(*args):
    """Run the `compress` CLI in-process."""
    from compressor.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2 with exactly one line on stderr, 'error: ...', naming every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    err = result.stderr
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err
