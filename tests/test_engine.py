"""The layer-wise engine and the quantize stage on tiny random models (seconds, CPU).

The central property: every linear is calibrated on the inputs it sees in the model as it is
when its turn comes, i.e. with every earlier block (and, true-sequentially, every earlier group
of its own block) already quantized. With true_sequential that state is exactly the final
quantized model, so each recorded Hessian must equal the one recomputed from the final model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compressor.engine as engine
import compressor.quantize as quantize_module
from compressor.algorithms.gptq import output_error
from compressor.architectures import LLAMA_LIKE
from compressor.engine import EngineOptions, auto_batch_size
from compressor.errors import UserError
from compressor.quantize import quantize_
from compressor.quantize import QuantizeStage
from conftest import make_tiny_llama

VOCAB = 49152
IDS = torch.randint(3, VOCAB, (8, 64), generator=torch.Generator().manual_seed(0))
GROUPS = [[f"model.layers.{b}.{rel}" for rel in group] for b in range(2) for group in LLAMA_LIKE.linear_groups]
LINEARS = [name for group in GROUPS for name in group]  # 14, in execution order


def stage(**options) -> QuantizeStage:
    return QuantizeStage(group_size=32, **options)


def options(batch_size: int = 0, **kwargs) -> EngineOptions:
    return EngineOptions(batch_size=batch_size, progress=False, **kwargs)


class Recorder:
    """Wraps the algorithm the engine drives: keeps each group's Hessian and the weights it got."""

    def __init__(self, inner):
        self.inner = inner
        self.hessians: dict[str, torch.Tensor] = {}
        self.order: list[list[str]] = []

    def compress(self, linears, stats):
        self.order.append([name for name, _ in linears])
        hessian = stats.hessian().clone()
        for name, _ in linears:
            self.hessians[name] = hessian
        return self.inner.compress(linears, stats)


def quantize_recording(model, quantize_stage, ids=IDS, engine_options=None):
    """quantize_ with the engine's algorithm wrapped in a Recorder."""
    recorders = []
    real = quantize_module.run_layerwise

    def spy(model, arch, calibration_ids, algorithm, opts):
        recorders.append(Recorder(algorithm))
        return real(model, arch, calibration_ids, recorders[-1], opts)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_module, "run_layerwise", spy)
        outcome = quantize_(model, quantize_stage, ids, engine_options or options())
    return outcome, recorders[0]


def linear_inputs_hessians(model, names, ids=IDS) -> dict[str, torch.Tensor]:
    """2/n X^T X of each named linear's input, from one plain forward of `model`."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: inputs[n].append(args[0].detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, xs in inputs.items():
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        out[n] = (2 * x.T @ x / x.shape[0]).float()
    return out


def decoder_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


@pytest.fixture(scope="module")
def dense():
    return make_tiny_llama()


@pytest.fixture(scope="module")
def one_pass():
    """The tiny Llama quantized with all 8 samples in one batch (one forward per block)."""
    model = make_tiny_llama()
    outcome, recorder = quantize_recording(model, stage())
    return model, outcome, recorder


# ----------------------------------------------------------------------------- coverage
def test_every_block_linear_is_quantized_and_lm_head_is_not(dense, one_pass):
    model, outcome, recorder = one_pass
    assert sorted(outcome.quantized) == sorted(LINEARS) == sorted(decoder_linears(model))
    assert sorted(outcome.layers) == sorted(LINEARS)
    assert "lm_head" not in outcome.quantized and "lm_head" not in outcome.layers
    # groups are handed over in execution order, the linears of a group together
    assert recorder.order == GROUPS
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in outcome.quantized:
            assert not torch.equal(p, dense_params[name]), name
            assert torch.equal(p, outcome.quantized[module].dequantize()), name
        else:  # embeddings (= the tied lm_head), norms
            assert torch.equal(p, dense_params[name]), name
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    for name, rec in outcome.layers.items():
        q = outcome.quantized[name]
        assert rec["shape"] == [q.out_features, q.in_features] == list(model.get_submodule(name).weight.shape)
        assert 0 < rec["relative_error"] < 0.05, name
        assert rec["damp_percent"] == 0.01
        assert (q.bits, q.group_size, q.sym) == (4, 32, True)
        assert torch.equal(q.g_idx, (torch.arange(q.in_features) // 32).to(torch.int32))  # static groups
        # the reported error is the output error on the Hessian the linear was calibrated on
        expected = output_error(dense.get_submodule(name).weight, q.dequantize(), recorder.hessians[name])
        assert rec["relative_error"] == pytest.approx(expected, rel=1e-5)


def test_logits_equal_a_model_built_from_the_records(one_pass):
    model, outcome, _ = one_pass
    reference = make_tiny_llama()
    for name, q in outcome.quantized.items():
        reference.get_submodule(name).weight.data = q.dequantize()
    ids = IDS[:2, :32]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        assert not torch.equal(make_tiny_llama()(ids).logits, reference(ids).logits)


# -------------------------------------------------------------------------- calibration
def test_each_linear_is_calibrated_on_the_quantized_prefix(dense, one_pass):
    """true_sequential: a group's Hessian comes from the model with everything before it quantized."""
    model, _, recorder = one_pass
    final = linear_inputs_hessians(model, LINEARS)
    before = linear_inputs_hessians(dense, LINEARS)
    for name in LINEARS:
        h = recorder.hessians[name]
        assert torch.allclose(h, final[name], rtol=1e-4, atol=1e-5 * float(final[name].abs().max())), name
    # ... and that is not what the dense model sees (except the very first group: same inputs)
    for name in GROUPS[0]:
        assert torch.allclose(recorder.hessians[name], before[name], rtol=1e-4, atol=1e-6)
    for name in LINEARS[3:]:
        assert not torch.allclose(recorder.hessians[name], before[name], rtol=1e-3, atol=1e-6), name


def test_block_one_sees_the_outputs_of_quantized_block_zero(dense, one_pass):
    """Quantizing block 1 on inputs recorded from (quantized block 0) reproduces the engine's codes."""
    model, outcome, _ = one_pass
    block0_outputs = []
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, args, kwargs: block0_outputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(input_ids=IDS, use_cache=False)
    finally:
        handle.remove()
    # a one-block model fed those hidden states through inputs_embeds: its block 0 is dense block 1
    single = make_tiny_llama(num_hidden_layers=1)
    single.model.layers[0].load_state_dict(dense.model.layers[1].state_dict())
    hidden = block0_outputs[0]
    captured = engine.capture_block_inputs  # the engine only needs the first block's inputs

    def from_hidden(model, arch, input_ids, batch_size, device):
        first = captured(model, arch, input_ids, batch_size, device)
        return [(hidden, kwargs) for _, kwargs in first]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "capture_block_inputs", from_hidden)
        again = quantize_(single, stage(), IDS, options())
    for rel in LLAMA_LIKE.block_linears(single.model.layers[0]):
        assert torch.equal(again.quantized[f"model.layers.0.{rel}"].codes, outcome.quantized[f"model.layers.1.{rel}"].codes), rel


def test_chunked_calibration_gives_the_same_codes(one_pass):
    _, outcome, _ = one_pass
    chunks = []
    real = engine.capture_block_inputs

    def spy(*args, **kwargs):
        chunks.append(real(*args, **kwargs))
        return chunks[-1]

    model = make_tiny_llama()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "capture_block_inputs", spy)
        chunked = quantize_(model, stage(), IDS, options(batch_size=3))
    assert [h.shape[0] for h, _ in chunks[0]] == [3, 3, 2]  # really several partial passes
    for name in LINEARS:
        assert torch.equal(chunked.quantized[name].codes, outcome.quantized[name].codes), name
        assert torch.equal(chunked.quantized[name].scales, outcome.quantized[name].scales), name


def test_true_sequential_off_calibrates_the_whole_block_on_dense_inputs(dense, one_pass):
    _, sequential, _ = one_pass
    model = make_tiny_llama()
    outcome, recorder = quantize_recording(model, stage(true_sequential=False))
    assert sorted(outcome.quantized) == sorted(LINEARS)
    # block 0 entirely sees the dense model's inputs
    before = linear_inputs_hessians(dense, LINEARS[:7])
    for name in LINEARS[:7]:
        assert torch.allclose(recorder.hessians[name], before[name], rtol=1e-4, atol=1e-6), name
    # so the first group agrees with true_sequential, a later one does not
    for name in GROUPS[0]:
        assert torch.equal(outcome.quantized[name].codes, sequential.quantized[name].codes)
    differs = [n for n in LINEARS[3:] if not torch.equal(outcome.quantized[n].codes, sequential.quantized[n].codes)]
    assert "model.layers.0.self_attn.o_proj" in differs and "model.layers.1.mlp.down_proj" in differs


def test_skip_patterns_leave_weights_untouched(dense):
    model = make_tiny_llama()
    outcome = quantize_(model, stage(skip=["*.down_proj", "lm_head"]), IDS, options())
    expected = [n for n in LINEARS if not n.endswith("down_proj")]
    assert sorted(outcome.quantized) == sorted(expected) and len(expected) == 12
    for b in range(2):
        name = f"model.layers.{b}.mlp.down_proj"
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)
    for name in expected:
        assert not torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)


def test_skip_by_block(dense):
    model = make_tiny_llama()
    outcome = quantize_(model, stage(skip=["model.layers.1.*"]), IDS, options())
    assert sorted(outcome.quantized) == sorted(LINEARS[:7])
    for name in LINEARS[7:]:
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)


# ------------------------------------------------------------------------ architectures
def _tiny(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)  # fmt: skip
    model = model_cls(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_llama_like_architectures(kind):
    if kind == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        model = _tiny(MistralConfig, MistralForCausalLM, head_dim=16)
    elif kind == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        model = _tiny(Qwen3Config, Qwen3ForCausalLM, head_dim=16)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = _tiny(Qwen2Config, Qwen2ForCausalLM)
    assert model.config.model_type == kind
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = IDS[:4, :32] % 512
    with torch.no_grad():
        dense_logits = model(ids).logits
    outcome = quantize_(model, stage(), ids, options())
    assert sorted(outcome.quantized) == sorted(LINEARS) == sorted(decoder_linears(model))
    for name in LINEARS:
        assert torch.equal(model.get_submodule(name).weight, outcome.quantized[name].dequantize())
        assert outcome.layers[name]["relative_error"] < 0.05
    biases = [n for n in before if n.endswith(".bias")]
    if kind == "qwen2":
        assert len(biases) == 6  # q/k/v in both blocks
    for n in biases:
        assert torch.equal(dict(model.named_parameters())[n], before[n])  # biases are not quantized
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.equal(logits, dense_logits)
    # 4-bit: the output moves, but not far
    assert float((logits - dense_logits).abs().mean() / dense_logits.abs().mean()) < 0.2


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(UserError) as info:
        quantize_(model, stage(), IDS[:2, :16] % 128, options())
    msg = str(info.value)
    assert "'gpt2'" in msg and "not supported" in msg
    for supported in ("llama", "mistral", "qwen2"):
        assert supported in msg


# -------------------------------------------------------------------------- batch size
def test_auto_batch_size_respects_the_budget(dense):
    assert auto_batch_size(dense, 8, 64, 1e-9) == 1  # nothing fits: one sample at a time
    assert auto_batch_size(dense, 8, 64, 100.0) == 8  # everything fits: never more than the samples
    budgets = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)  # GB; one 64-token sample of the tiny model is ~0.3 MB
    sizes = [auto_batch_size(dense, 1000, 64, gb) for gb in budgets]
    assert sizes == sorted(sizes) and 1 < sizes[0] < sizes[-1] < 1000
    assert 12 * sizes[0] <= sizes[-1] <= 16 * sizes[0] + 16  # proportional to the budget
    assert auto_batch_size(dense, 1000, 128, 1e-3) < auto_batch_size(dense, 1000, 64, 1e-3)  # longer, fewer


def test_engine_uses_the_auto_batch_size(dense):
    seen = []

    class Stop(Exception):
        pass

    def spy(model, arch, input_ids, batch_size, device):
        seen.append(batch_size)
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "capture_block_inputs", spy)
        for gb, expected in ((1e-9, 1), (100.0, 8)):
            with pytest.raises(Stop):
                quantize_(make_tiny_llama(), stage(), IDS, options(max_activation_gb=gb))
            assert seen[-1] == expected
            with pytest.raises(Stop):
                quantize_(make_tiny_llama(), stage(), IDS, options(batch_size=3, max_activation_gb=gb))
            assert seen[-1] == 3  # an explicit batch size wins


def test_moving_the_model_front_keeps_tied_embeddings_tied():
    # The GPU path moves everything outside the blocks to the device and back; a tied lm_head
    # must stay the very same parameter as the embeddings and the blocks must not move. No GPU
    # here, so a dtype conversion exercises the same mechanism.
    from compressor.architectures import architecture_of
    from compressor.engine import _move_except_blocks

    model = make_tiny_llama()
    arch = architecture_of(model)
    _move_except_blocks(model, arch, torch.float64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.float64 and model.model.norm.weight.dtype == torch.float64
    assert arch.block_list(model)[0].mlp.up_proj.weight.dtype == torch.float32
    assert len(arch.block_list(model)) == 2


# --- memory: a wide layer's Hessian waits on disk during the column loop -------------------------


def test_hessian_offloaded_during_the_column_loop_gives_the_same_result(monkeypatch, one_pass):
    """With every Hessian offloaded (threshold 0), the quantized model and records are those of
    the in-memory path, and the Hessian's memory really is released during the loop."""
    import compressor.algorithms.gptq as gptq

    sizes_in_loop = []
    real = gptq.gptq_quantize

    def spy(weight, hessian, **kwargs):
        sizes_in_loop.append(kwargs["prepared"].factor.shape[0])
        return real(weight, hessian, **kwargs)

    model = make_tiny_llama()
    monkeypatch.setattr(quantize_module, "OFFLOAD_HESSIAN_BYTES", 0)
    monkeypatch.setattr(quantize_module, "gptq_quantize", spy)
    freed = []
    real_on_disk = quantize_module.tensor_on_disk

    def watching(tensor):
        class Watch:
            def __enter__(self):
                self.inner = real_on_disk(tensor)
                self.inner.__enter__()
                freed.append(tensor.untyped_storage().nbytes() == 0)

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

        return Watch()

    monkeypatch.setattr(quantize_module, "tensor_on_disk", watching)
    outcome = quantize_(model, stage(), IDS, options())
    ref_model, ref, _ = one_pass
    assert sizes_in_loop and freed and all(freed)
    assert outcome.layers.keys() == ref.layers.keys()
    for name, record in outcome.layers.items():
        assert record["relative_error"] == ref.layers[name]["relative_error"], name
        assert torch.equal(outcome.quantized[name].codes, ref.quantized[name].codes), name
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.equal(p, q), name


def test_tensor_on_disk_frees_and_restores_in_place():
    t = torch.randn(300, 200)
    expected, row = t.clone(), t[7]
    with quantize_module.tensor_on_disk(t):
        assert t.untyped_storage().nbytes() == 0
    assert torch.equal(t, expected) and torch.equal(row, expected[7])
    with pytest.raises(RuntimeError, match="boom"):
        with quantize_module.tensor_on_disk(t):
            raise RuntimeError("boom")
    assert torch.equal(t, expected)  # restored on the way out of an error too
    view = t[10:20]
    with quantize_module.tensor_on_disk(view):  # a view of a bigger storage: left alone
        assert t.untyped_storage().nbytes() == 300 * 200 * 4
