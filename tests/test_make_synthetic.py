"""benchmarks/make_synthetic.py: a tiny random Llama checkpoint, sharded small (seconds), and the
nominal sizes' parameter counts (computed, never written)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def _load_script(path: Path):
    """Import a benchmarks/ script by its path, without putting benchmarks/ on sys.path (where its
    file names could shadow installed modules for every later test)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


make_synthetic = _load_script(Path(__file__).resolve().parent.parent / "benchmarks" / "make_synthetic.py")

TINY = ["--params", "tiny", "--max-shard-size", "20KB", "--no-progress"]


def _write(out: Path, *extra: str) -> Path:
    assert make_synthetic.main([*TINY, "--out", str(out), *extra]) == 0
    return out


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*-of-*.safetensors"))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in _shards(path):
        with safe_open(shard, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("synthetic") / "tiny")


def test_layout_and_index(tiny):
    config = make_synthetic.make_config("tiny")
    specs = make_synthetic.tensor_specs(config)
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {name for name, _ in specs}
    shards = _shards(tiny)
    assert len(shards) > 2  # 20KB shards: the embeddings alone, the layers split up
    assert {p.name for p in shards} == set(index["weight_map"].values())
    assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    tensors = _tensors(tiny)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == dict(specs)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    # consecutive tensors per shard, in the spec order; none over the limit unless alone
    order = [index["weight_map"][name] for name, _ in specs]
    assert order == sorted(order)
    for shard in shards:
        with safe_open(shard, "pt") as f:
            sizes = [f.get_slice(n).get_shape() for n in f.keys()]
        nbytes = sum(make_synthetic.numel(s) * 2 for s in sizes)
        assert nbytes <= 20_000 or len(sizes) == 1
    w = tensors["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is False
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert (tiny / "tokenizer.json").is_file()
    assert not list(tiny.parent.glob("*.tmp-*"))


def test_loads_with_transformers(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype="auto").eval()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    on_disk = _tensors(tiny)
    assert torch.equal(model.state_dict()["model.layers.1.self_attn.k_proj.weight"],
                       on_disk["model.layers.1.self_attn.k_proj.weight"])
    ids = AutoTokenizer.from_pretrained(tiny)("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_deterministic_seed_and_overwrite(tiny, tmp_path):
    again = _write(tmp_path / "again")
    assert [p.read_bytes() for p in _shards(again)] == [p.read_bytes() for p in _shards(tiny)]
    # another seed: --overwrite replaces an earlier output, with other weights (norms stay 1.0)
    _write(again, "--seed", "1", "--overwrite")
    a, b = _tensors(tiny), _tensors(again)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_refuses_unrelated_or_existing_dir(tiny, tmp_path, capsys):
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exc:
            make_synthetic.main([*TINY, "--out", str(unrelated), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err
    assert [p.name for p in unrelated.iterdir()] == ["notes.txt"]
    assert (unrelated / "notes.txt").read_text() == "keep me"
    # an earlier output without --overwrite
    before = sorted(p.name for p in tiny.iterdir())
    with pytest.raises(SystemExit) as exc:
        make_synthetic.main([*TINY, "--out", str(tiny)])
    assert exc.value.code == 2
    assert sorted(p.name for p in tiny.iterdir()) == before
    for bad in (["--max-shard-size", "lots"], ["--layers", "0"], ["--params", "7B"]):
        with pytest.raises(SystemExit) as exc:
            make_synthetic.main([*TINY, "--out", str(tmp_path / "x"), *bad])
        assert exc.value.code == 2
    assert not (tmp_path / "x").exists()


def test_interrupted_leaves_nothing(tmp_path, monkeypatch):
    real = make_synthetic.make_tensor
    calls = []

    def flaky(name, shape, seed):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(name, shape, seed)

    monkeypatch.setattr(make_synthetic, "make_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic.main([*TINY, "--out", str(tmp_path / "cut")])
    assert list(tmp_path.iterdir()) == []


def test_nominal_sizes_and_layers(capsys):
    tok = make_synthetic.smollm2_tokenizer()
    for size, nominal in make_synthetic.NOMINAL.items():
        config = make_synthetic.make_config(size, tokenizer=tok)
        specs = make_synthetic.tensor_specs(config)
        params = sum(make_synthetic.numel(s) for _, s in specs)
        assert abs(params / nominal - 1) < 0.05, (size, params)
    make_synthetic.check_against_transformers(make_synthetic.make_config("8B", tokenizer=tok),
                                              make_synthetic.tensor_specs(make_synthetic.make_config("8B", tokenizer=tok)))
    short = make_synthetic.make_config("14B", layers=3, tokenizer=tok)
    assert short.num_hidden_layers == 3 and short.hidden_size == 5120
    assert make_synthetic.main(["--params", "3B", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 3,020,067,840" in out and '"num_hidden_layers": 27' in out


def test_parse_size():
    assert make_synthetic.parse_size("2GB") == 2 * 10**9
    assert make_synthetic.parse_size("20KB") == 20_000
    assert make_synthetic.parse_size("1GiB") == 2**30
    assert make_synthetic.parse_size("500mb") == 500 * 10**6
    assert make_synthetic.parse_size("4096") == 4096
