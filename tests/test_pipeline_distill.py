"""The distill stage inside `compress run`: prune -> distill -> export, and --resume after a crash."""

from __future__ import annotations

import json

import pytest
import torch

import compressor.distill
from compressor.errors import RecipeError
from compressor.pipeline import run, validate
from compressor.recipe import load_recipe

STAGES = (
    "[{prune: {method: structured, target: layers, count: 1}},"
    " {distill: {steps: 6, batch_size: 2, seq_len: 32, lr: 1.0e-3, warmup_steps: 1, eval_every: 3, checkpoint_every: 2}}]"
)


def _recipe(tiny_llama_dir, out, stages=STAGES):
    return load_recipe(None, [
        f"model={tiny_llama_dir}",
        "data.calibration={samples: 4, seq_len: 64}",
        "data.evaluation={seq_len: 128, max_windows: 2}",
        f"stages={stages}",
        "export.format=dense",
        f"output={out}",
    ])  # fmt: skip


def test_prune_then_distill_then_export(tiny_llama_dir, tmp_path):
    result = run(_recipe(tiny_llama_dir, tmp_path / "a"), progress=False)
    d = result.report.stages[1].distill
    assert d["steps"] == 6 and d["tokens_seen"] == 6 * 2 * 32
    assert [s for s, _ in d["eval_history"]] == [0, 3, 6]
    assert (tmp_path / "a" / "distill_stage1.png").stat().st_size > 5_000
    assert "## Distillation (stage 1)" in (tmp_path / "a" / "report.md").read_text()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["num_hidden_layers"] == 1
    assert not (tmp_path / "a.distill-ckpt").exists()  # removed once the artifact is complete

    from click.testing import CliRunner

    from compressor.cli import main

    info = CliRunner().invoke(main, ["info", str(tmp_path / "a")])
    assert info.exit_code == 0 and "dense llama checkpoint, 1 layers" in info.output


def test_resume_after_a_crash_ends_where_an_uninterrupted_run_does(tiny_llama_dir, tmp_path, monkeypatch):
    straight = run(_recipe(tiny_llama_dir, tmp_path / "straight"), progress=False).model

    real = compressor.distill.training_batch

    def crash_at_step_4(*args, **kwargs):
        if args[4] == 4:  # (train_ids, seq_len, batch_size, seed, step, micro, ...): 4 steps done
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(compressor.distill, "training_batch", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(tiny_llama_dir, tmp_path / "b"), progress=False)
    assert (tmp_path / "b.distill-ckpt" / "stage1" / "checkpoint.pt").exists()
    assert not (tmp_path / "b").exists()  # nothing half-written
    monkeypatch.setattr(compressor.distill, "training_batch", real)

    resumed = run(_recipe(tiny_llama_dir, tmp_path / "b"), progress=False, resume=True)
    assert resumed.report.stages[1].distill["resumed_from"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_distill_after_unstructured_pruning_is_refused(tiny_llama_dir, tmp_path):
    stages = "[{prune: {method: wanda, sparsity: 0.5}}, {distill: {steps: 2, warmup_steps: 1}}]"
    with pytest.raises(RecipeError, match="refill the pruned weights"):
        validate(_recipe(tiny_llama_dir, tmp_path / "c", stages))
