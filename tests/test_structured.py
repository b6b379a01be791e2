"""Structured pruning (compressor/structured.py) on tiny random Llama / Qwen2 models.

Each target must give a smaller dense model whose rewritten config loads with plain
`AutoModelForCausalLM.from_pretrained` to the same logits; the importance scores must decide what
goes (planted dead channels / heads / an identity layer are removed first); bad requests are
one-line UserErrors naming the recipe key.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compressor.errors import UserError
from compressor.prune import PruneStage
from compressor.structured import prune_structured_
from conftest import make_tiny_llama

KEY = "stages[0].prune"
IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))


def tiny(**overrides):
    return make_tiny_llama(vocab_size=512, **{"num_hidden_layers": 4, **overrides})


def tiny_qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True, sliding_window=16,
               max_window_layers=2, tie_word_embeddings=True)  # fmt: skip
    cfg.update(overrides)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    model.requires_grad_(False)
    return model


def prune(model, **options):
    stage = PruneStage(method="structured", **options)
    return prune_structured_(model, stage, IDS, key=KEY, batch_size=3, progress=False)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def reload(model, path):
    """Save, load back with transformers alone, and check the logits match the in-memory model."""
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=1e-5, rtol=0)
    if loaded.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    return loaded, json.loads((path / "config.json").read_text())


def greedy(model, use_cache: bool):
    with torch.no_grad():
        return model.generate(IDS[:2, :8], max_new_tokens=12, do_sample=False, use_cache=use_cache, pad_token_id=2)


def attn(model, i):
    return model.model.layers[i].self_attn


def mlp(model, i):
    return model.model.layers[i].mlp


# ----------------------------------------------------------------------------- MLP channels
def test_mlp_channels_shrinks_every_layer_and_reloads(tmp_path):
    model = tiny()
    before = params(model)
    report = prune(model, target="mlp_channels", ratio=0.25)
    assert model.config.intermediate_size == 96 and report["config"] == {"intermediate_size": 96}
    for i in range(4):
        assert mlp(model, i).gate_proj.weight.shape == (96, 64) and mlp(model, i).up_proj.weight.shape == (96, 64)
        assert mlp(model, i).down_proj.weight.shape == (64, 96)
        assert len(report["removed"][f"model.layers.{i}"]) == 32
    assert before - params(model) == 4 * 32 * 3 * 64
    after = params(model)
    assert report["parameters"] == {"before": before, "after": after, "removed_fraction": pytest.approx(1 - after / before, abs=1e-6)}
    _, saved = reload(model, tmp_path)
    assert saved["intermediate_size"] == 96


def test_mlp_dead_channels_go_first_and_kept_weights_are_untouched():
    model = tiny()
    original = [{n: getattr(mlp(model, i), n).weight.clone() for n in ("gate_proj", "down_proj")} for i in range(4)]
    dead = {}
    for i in range(4):
        channels = sorted(torch.randperm(128, generator=torch.Generator().manual_seed(i))[:8].tolist())
        dead[i] = channels
        if i % 2:  # activation 0: up(x)_j = 0
            mlp(model, i).up_proj.weight[channels] = 0
        else:  # activation nonzero but nothing reaches the output: the down_proj factor of the score
            mlp(model, i).down_proj.weight[:, channels] = 0
    report = prune(model, target="mlp_channels", ratio=8 / 128)
    for i in range(4):
        assert report["removed"][f"model.layers.{i}"] == dead[i]
        keep = [j for j in range(128) if j not in dead[i]]
        torch.testing.assert_close(mlp(model, i).gate_proj.weight, original[i]["gate_proj"][keep], atol=0, rtol=0)
        torch.testing.assert_close(mlp(model, i).down_proj.weight, original[i]["down_proj"][:, keep], atol=0, rtol=0)
        assert report["importance"][f"model.layers.{i}"]["removed_share"] == 0


def test_keeps_dtype_and_tied_embeddings():
    model = tiny().to(torch.bfloat16)
    prune(model, target="heads", ratio=0.5)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(IDS).logits.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- heads
def test_heads_query_mode_keeps_kv_heads_and_reloads(tmp_path):
    model = tiny()
    before = params(model)
    report = prune(model, target="heads", ratio=0.5)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 16)
    for i in range(4):
        a = attn(model, i)
        assert a.q_proj.out_features == 32 and a.o_proj.in_features == 32
        assert a.k_proj.out_features == 32 and a.v_proj.out_features == 32  # every KV head stays
        gone = report["removed"][f"model.layers.{i}"]
        assert gone["kv_groups"] == [] and len([h for h in gone["query_heads"] if h < 2]) == 1  # one per group
    assert before - params(model) == 4 * 2 * 16 * 64 * 2  # q rows + o columns of 2 heads per layer
    loaded, saved = reload(model, tmp_path)
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (2, 2, 16)
    assert attn(loaded, 0).num_key_value_groups == 1


def test_heads_query_mode_removes_the_same_number_in_every_group(tmp_path):
    model = tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    report = prune(model, target="heads", ratio=0.5)  # 2 of the 4 query heads of each group
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    for i in range(4):
        gone = report["removed"][f"model.layers.{i}"]["query_heads"]
        assert sum(h < 4 for h in gone) == 2 and sum(h >= 4 for h in gone) == 2
        assert attn(model, i).num_key_value_groups == 2
    reload(model, tmp_path)


def test_dead_query_heads_are_dropped_in_query_mode():
    model = tiny()
    q0 = [attn(model, i).q_proj.weight.clone() for i in range(4)]
    dead = {i: [i % 2, 2 + (i + 1) % 2] for i in range(4)}  # one head per KV group, varying by layer
    for i, heads in dead.items():
        for h in heads:
            attn(model, i).q_proj.weight[h * 16 : (h + 1) * 16] = 0
            attn(model, i).o_proj.weight[:, h * 16 : (h + 1) * 16] = 0
    report = prune(model, target="heads", ratio=0.5)
    for i, heads in dead.items():
        assert report["removed"][f"model.layers.{i}"]["query_heads"] == heads
        keep = [h for h in range(4) if h not in heads]
        rows = [h * 16 + j for h in keep for j in range(16)]
        torch.testing.assert_close(attn(model, i).q_proj.weight, q0[i][rows], atol=0, rtol=0)


def test_heads_groups_mode_removes_whole_groups(tmp_path):
    model = tiny()
    dead_group = {i: i % 2 for i in range(4)}
    for i, g in dead_group.items():  # both query heads of the group contribute nothing
        attn(model, i).o_proj.weight[:, g * 32 : (g + 1) * 32] = 0
    before = params(model)
    report = prune(model, target="heads", ratio=0.5, heads_mode="groups")
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 1, 16)
    for i, g in dead_group.items():
        assert report["removed"][f"model.layers.{i}"] == {"kv_groups": [g], "query_heads": [2 * g, 2 * g + 1]}
        a = attn(model, i)
        widths = (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features)
        assert widths == (32, 16, 16, 32)
    assert before - params(model) == 4 * (2 * 16 * 64 * 2 + 2 * 16 * 64)  # q+o of 2 heads, k+v of 1 group
    reload(model, tmp_path)


@pytest.mark.parametrize("mode", ["query", "groups"])
def test_qwen2_heads_slice_biases_and_reload(tmp_path, mode):
    model = tiny_qwen2()
    a = attn(model, 0)
    q_bias, k_bias = a.q_proj.bias.clone(), a.k_proj.bias.clone()
    report = prune(model, target="heads", ratio=0.5, heads_mode=mode)
    gone = report["removed"]["model.layers.0"]
    keep = [h for h in range(4) if h not in gone["query_heads"]]
    torch.testing.assert_close(a.q_proj.bias, q_bias[[h * 16 + j for h in keep for j in range(16)]], atol=0, rtol=0)
    kv_keep = [g for g in range(2) if g not in gone["kv_groups"]]
    torch.testing.assert_close(a.k_proj.bias, k_bias[[g * 16 + j for g in kv_keep for j in range(16)]], atol=0, rtol=0)
    assert a.v_proj.bias.shape == (len(kv_keep) * 16,)
    _, saved = reload(model, tmp_path)
    assert saved["head_dim"] == 16  # Qwen2Config has no head_dim field: it must be written


# ----------------------------------------------------------------------------- layers
def make_identity(model, i):
    attn(model, i).o_proj.weight.zero_()
    mlp(model, i).down_proj.weight.zero_()


def test_identity_layer_is_removed_first_and_cache_still_works(tmp_path):
    model = tiny()
    make_identity(model, 2)
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    before = params(model)
    report = prune(model, target="layers", count=1)
    assert report["removed"] == [2] and report["kept"] == [0, 1, 3]
    assert report["importance"]["block_influence"][2] == pytest.approx(0, abs=1e-6)
    assert min(v for i, v in enumerate(report["importance"]["block_influence"]) if i != 2) > 1e-3
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert [attn(model, i).layer_idx for i in range(3)] == [0, 1, 2]
    assert before - params(model) == per_layer
    loaded, saved = reload(model, tmp_path)
    assert saved["num_hidden_layers"] == 3
    for m in (model, loaded):
        assert torch.equal(greedy(m, use_cache=True), greedy(m, use_cache=False))


def test_layers_lowest_block_influence_and_skip_protects():
    model = tiny()
    make_identity(model, 1)
    report = prune(model, target="layers", count=2)
    bi = report["importance"]["block_influence"]
    assert report["removed"] == sorted(sorted(range(4), key=lambda i: bi[i])[:2]) and 1 in report["removed"]

    model = tiny()
    make_identity(model, 1)
    report = prune(model, target="layers", count=1, skip=["lm_head", "model.layers.1"])
    assert report["removed"] != [1] and report["importance"]["protected"] == [1]


def test_qwen2_layer_removal_filters_layer_types(tmp_path):
    model = tiny_qwen2()
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    make_identity(model, 1)
    report = prune(model, target="layers", count=1)
    assert report["removed"] == [1]
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert model.config.max_window_layers == 1
    loaded, saved = reload(model, tmp_path)
    assert saved["layer_types"] == model.config.layer_types
    assert torch.equal(greedy(loaded, use_cache=True), greedy(loaded, use_cache=False))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make, options, where",
    [
        (tiny, dict(target="layers", count=4), "count"),
        (tiny, dict(target="layers", count=7), "count"),
        (tiny, dict(target="layers", count=3, skip=["model.layers.0", "model.layers.3"]), "count"),
        (tiny, dict(target="mlp_channels", ratio=0.001), "ratio"),  # removes 0 of 128
        (tiny, dict(target="mlp_channels", ratio=0.999), "ratio"),  # removes all 128
        (tiny, dict(target="mlp_channels", ratio=0.25, skip=["model.layers.1.mlp.*"]), "skip"),
        (tiny, dict(target="heads", ratio=0.9), "ratio"),  # 2 of 2 heads per group
        (tiny, dict(target="heads", ratio=0.9, heads_mode="groups"), "ratio"),  # 2 of 2 groups
        (lambda: tiny(num_key_value_heads=1), dict(target="heads", ratio=0.5, heads_mode="groups"), "heads_mode"),
        (lambda: tiny(num_key_value_heads=4), dict(target="heads", ratio=0.5), "heads_mode"),  # 1 query head/group
        # 3 query heads per group: round(0.1 * 3) = 0
        (lambda: tiny(hidden_size=48, num_attention_heads=6, head_dim=8), dict(target="heads", ratio=0.1), "ratio"),
        # 8 -> 6 heads: LlamaConfig rejects hidden 64 % 6 heads, even with an explicit head_dim
        (lambda: tiny(num_attention_heads=8, head_dim=8), dict(target="heads", ratio=0.25), "ratio"),
    ],
)
def test_bad_requests_are_one_line_user_errors(make, options, where):
    model = make()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as info:
        prune(model, **options)
    message = str(info.value)
    assert message.startswith(f"{KEY}.{where}:") and "\n" not in message
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # nothing was touched


def test_llama_head_count_error_lists_ratios_that_load():
    model = tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    with pytest.raises(UserError, match=r"ratios that load: 0\.5 \(2 of 4 query heads per group\), 0\.75"):
        prune(model, target="heads", ratio=0.25)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    with pytest.raises(UserError, match="not supported"):
        prune(model, target="layers", count=1)


@pytest.mark.parametrize("batch_size, forwards", [(1, 4), (3, 2), (0, 1)], ids=["batch1", "batch3", "auto"])
def test_the_prune_stage_passes_the_engines_batch_size_and_device(batch_size, forwards):
    """Structured pruning runs its importance pass with the engine's batch size (0: as many
    samples as max_activation_gb allows) on the engine's device, and leaves the model where it was."""
    from compressor.engine import EngineOptions
    from compressor.prune import prune_

    model = tiny()
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda module, args, out: seen.append((args[0].shape[0], args[0].device)))
    engine = EngineOptions(device=torch.device("cpu"), batch_size=batch_size, progress=False)
    prune_(model, PruneStage(method="structured", target="mlp_channels", ratio=0.25), IDS, engine, key=KEY)
    assert len(seen) == forwards and sum(n for n, _ in seen) == IDS.shape[0]
    assert all(device == engine.device for _, device in seen) and next(model.parameters()).device.type == "cpu"
