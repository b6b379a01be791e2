"""Distillation: the losses against hand-computed values, the training loop on a tiny random Llama
(KD lowers the KL, schedule, accumulation, clipping), resume after a real kill -9, the errors, and
the layer-dropping student."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from compressor.algorithms.distill_losses import (
    combined_loss,
    forward_kl,
    hidden_state_loss,
    lm_loss,
    reverse_kl,
)
from compressor.distill import (
    CHECKPOINT_NAME,
    distill_,
    lr_factor,
    plot_distill_curves,
    student_from_teacher_layers,
    training_batch,
)
from compressor.errors import RecipeError, UserError
from compressor.distill import DistillStage
from compressor.recipe import load_recipe
from conftest import make_tiny_llama

LN2, LN3 = math.log(2), math.log(3)
VOCAB = 512


def logits_of(*rows):
    """[1, S, V] logits whose softmax is exactly the given probability rows."""
    return torch.tensor([rows], dtype=torch.float64).log().float()


# The 2-token, 3-word example: teacher and student distributions per position.
TEACHER = logits_of([0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3])
STUDENT = logits_of([0.25, 0.5, 0.25], [0.5, 0.25, 0.25])
# KL(t || s) per token:
#   token 0: 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0.25 ln 1 = 0.25 ln 2
#   token 1: sum_i 1/3 ln((1/3)/q_i) = -ln 3 - (ln 0.5 + 2 ln 0.25)/3 = (5/3) ln 2 - ln 3
FKL = (0.25 * LN2, 5 / 3 * LN2 - LN3)  # 0.173287, 0.056633
# KL(s || t) per token:
#   token 0: 0.25 ln(0.25/0.5) + 0.5 ln(0.5/0.25) = 0.25 ln 2
#   token 1: sum_i q_i ln(q_i / (1/3)) = ln 3 + 0.5 ln 0.5 + 0.5 ln 0.25 = ln 3 - 1.5 ln 2
RKL = (0.25 * LN2, LN3 - 1.5 * LN2)  # 0.173287, 0.058892


# ----------------------------------------------------------------------------- losses
def test_forward_kl_by_hand():
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx((FKL[0] + FKL[1]) / 2, rel=1e-6)
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(0.1149599, abs=1e-6)
    assert forward_kl(TEACHER, TEACHER).item() == pytest.approx(0.0, abs=1e-7)


def test_reverse_kl_by_hand():
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx((RKL[0] + RKL[1]) / 2, rel=1e-6)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(0.1160892, abs=1e-6)
    # forward(s, t) is reverse with the roles exchanged
    assert forward_kl(TEACHER, STUDENT).item() == pytest.approx(reverse_kl(STUDENT, TEACHER).item(), rel=1e-6)


def test_temperature_divides_logits_and_scales_by_t_squared():
    # Logits multiplied by T give back the same softmax at temperature T, so the KL is T^2 times
    # the T = 1 value (Hinton's scaling); without the division by T it would be something else.
    for fn, parts in ((forward_kl, FKL), (reverse_kl, RKL)):
        at_t2 = fn(2 * STUDENT, 2 * TEACHER, temperature=2.0).item()
        assert at_t2 == pytest.approx(4 * (parts[0] + parts[1]) / 2, rel=1e-5)
        at_t4 = fn(4 * STUDENT, 4 * TEACHER, temperature=4.0).item()
        assert at_t4 == pytest.approx(16 * (parts[0] + parts[1]) / 2, rel=1e-5)
    # and a temperature flattens both distributions: KL at T=2 on the same logits is smaller than T^2 * KL
    assert forward_kl(STUDENT, TEACHER, temperature=2.0).item() < 4 * forward_kl(STUDENT, TEACHER).item()


def test_masks_select_tokens():
    only_first = torch.tensor([[True, False]])
    only_second = torch.tensor([[False, True]])
    assert forward_kl(STUDENT, TEACHER, mask=only_first).item() == pytest.approx(FKL[0], rel=1e-6)
    assert forward_kl(STUDENT, TEACHER, mask=only_second).item() == pytest.approx(FKL[1], rel=1e-6)
    assert reverse_kl(STUDENT, TEACHER, mask=only_second).item() == pytest.approx(RKL[1], rel=1e-6)
    # masked-out tokens do not count even when they are wild; the mean is over selected tokens only
    wild_s = torch.cat([STUDENT, torch.tensor([[[30.0, -30.0, 0.0], [0.0, 0.0, 0.0]]])])
    wild_t = torch.cat([TEACHER, torch.tensor([[[-30.0, 30.0, 0.0], [0.0, 0.0, 0.0]]])])
    mask = torch.tensor([[True, True], [False, False]])
    assert forward_kl(wild_s, wild_t, mask=mask).item() == pytest.approx((FKL[0] + FKL[1]) / 2, rel=1e-6)
    assert forward_kl(wild_s, wild_t).item() > 10  # the wild token does dominate when not masked
    with pytest.raises(ValueError, match="selects no token"):
        forward_kl(STUDENT, TEACHER, mask=torch.zeros(1, 2, dtype=torch.bool))


def test_lm_loss_by_hand():
    # 3 tokens give 2 next-token predictions; the last position's logits have no target.
    logits = logits_of([0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.9, 0.05, 0.05])
    ids = torch.tensor([[0, 1, 2]])
    # position 0 predicts id 1: -ln 0.5 = ln 2; position 1 predicts id 2: -ln 0.25 = 2 ln 2
    assert lm_loss(logits, ids).item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert lm_loss(logits, ids, mask=torch.tensor([[False, True, True]])).item() == pytest.approx(2 * LN2, rel=1e-6)
    assert lm_loss(logits, ids, mask=torch.tensor([[True, False, False]])).item() == pytest.approx(LN2, rel=1e-6)


def test_hidden_state_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    # MSE per token (mean over the width): token 0 (1^2 + 0)/2 = 0.5, token 1 (1 + 0)/2 = 0.5
    assert hidden_state_loss(s, t, "mse").item() == pytest.approx(0.5, rel=1e-6)
    assert hidden_state_loss(s, t, "mse", mask=torch.tensor([[True, False]])).item() == pytest.approx(0.5, rel=1e-6)
    t2 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert hidden_state_loss(s, t2, "mse").item() == pytest.approx(0.25, rel=1e-6)  # (0 + 0.5) / 2
    # cosine: token 0 parallel -> 0; token 1 cos 45 degrees -> 1 - 1/sqrt(2)
    assert hidden_state_loss(s, t, "cosine").item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, rel=1e-6)
    assert hidden_state_loss(s, t, "cosine", mask=torch.tensor([[False, True]])).item() == pytest.approx(
        1 - 1 / math.sqrt(2), rel=1e-6
    )


def test_combined_loss_weights():
    ids = torch.tensor([[0, 1]])
    kd = (FKL[0] + FKL[1]) / 2
    lm = LN2  # position 0 of STUDENT gives id 1 probability 0.5
    s_h = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t_h = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    hid = 0.5
    total, parts = combined_loss(STUDENT, TEACHER, ids)
    assert total.item() == pytest.approx(kd, rel=1e-6)
    assert parts["lm"].item() == pytest.approx(lm, rel=1e-6)  # recorded although its weight is 0
    total, parts = combined_loss(STUDENT, TEACHER, ids, lm_weight=0.25, hidden_loss="mse", hidden_weight=2.0,
                                 hidden_pairs=[(s_h, t_h), (t_h, t_h)])  # fmt: skip
    # the hidden part is the mean over pairs: (0.5 + 0) / 2
    assert parts["hidden"].item() == pytest.approx(hid / 2, rel=1e-6)
    assert total.item() == pytest.approx(0.75 * kd + 0.25 * lm + 2.0 * hid / 2, rel=1e-6)
    assert parts["total"].item() == pytest.approx(total.item())
    total, parts = combined_loss(STUDENT, TEACHER, ids, loss="reverse_kl", lm_weight=1.0)
    assert total.item() == pytest.approx(lm, rel=1e-6)
    assert parts["kd"].item() == pytest.approx((RKL[0] + RKL[1]) / 2, rel=1e-6)
    total, parts = combined_loss(STUDENT, None, ids, lm_weight=1.0)  # plain fine-tuning: no teacher needed
    assert total.item() == pytest.approx(lm, rel=1e-6) and "kd" not in parts
    # gradients flow only through weighted parts
    s = STUDENT.clone().requires_grad_(True)
    combined_loss(s, TEACHER, ids, lm_weight=0.0)[0].backward()
    g_kd = s.grad.clone()
    assert g_kd[0, 1].abs().sum() > 0
    s.grad = None
    combined_loss(s, TEACHER, ids, lm_weight=1.0)[0].backward()
    assert s.grad[0, 1].abs().sum() == 0  # the LM loss ignores the last position's logits


# ----------------------------------------------------------------------------- training
def _stream(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def _options(**kw):
    base = dict(steps=4, batch_size=2, seq_len=16, warmup_steps=1, lr=1e-3, eval_every=0, checkpoint_every=0)
    base.update(kw)
    return DistillStage(**base)


@pytest.fixture
def pair():
    teacher = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4)
    return teacher, student_from_teacher_layers(teacher, [0, 3])


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl"])
def test_kd_lowers_the_kl_on_held_out_ids(loss):
    # A wider initialization makes the random teacher's distributions far from uniform, so there is
    # something to learn (with 0.02 every distribution is nearly uniform and the KL tiny).
    teacher = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4, initializer_range=0.1)
    student = student_from_teacher_layers(teacher, [0, 3])
    held_out = _stream(4 * 32, seed=99).view(4, 32)
    fn = forward_kl if loss == "forward_kl" else reverse_kl

    def kl():
        with torch.no_grad():
            return fn(student(held_out).logits, teacher(held_out).logits).item()

    before = kl()
    opts = _options(loss=loss, steps=30, batch_size=4, seq_len=32, warmup_steps=3, lr=3e-3)
    report = distill_(student, teacher, opts, _stream(4000, seed=1), None, 32, None, progress=False)
    after = kl()
    assert after < 0.8 * before, (before, after)
    assert len(report["loss_history"]) == 30 and report["loss_parts"]["kd"][-1] < report["loss_parts"]["kd"][0]
    assert report["tokens_seen"] == 30 * 4 * 32
    # the student leaves as it came: frozen, eval mode; the teacher was never changed
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    untouched = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4, initializer_range=0.1)
    for a, b in zip(teacher.parameters(), untouched.parameters()):
        assert torch.equal(a, b)


def test_lr_schedule_warmup_then_cosine_to_min():
    steps, warm, floor = 12, 3, 0.1
    f = [lr_factor(s, steps, warm, floor) for s in range(steps)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up, peak at step `warm`
    assert f[-1] == pytest.approx(floor)  # the last step is at lr * min_lr_ratio
    assert f[3 + 4] == pytest.approx(floor + (1 - floor) / 2)  # half-way through the cosine (8 steps)
    assert f[4] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 8)))
    assert all(a > b for a, b in zip(f[3:], f[4:]))  # decreasing after the peak
    assert lr_factor(0, 5, 0, 0.0) == 1.0 and lr_factor(4, 5, 0, 0.0) == pytest.approx(0.0)

    # the loop uses it, one scheduler step per optimizer step (also with accumulation)
    teacher = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=2)
    student = student_from_teacher_layers(teacher, [1])
    opts = _options(steps=steps, warmup_steps=warm, min_lr_ratio=floor, lr=2e-3, grad_accum=2, batch_size=1)
    report = distill_(student, teacher, opts, _stream(500, 1), None, 16, None, progress=False)
    assert report["lr_history"] == pytest.approx([2e-3 * x for x in f])


def test_gradient_accumulation_equals_a_larger_batch(pair, monkeypatch):
    import compressor.distill as distill

    teacher, student0 = pair
    windows = _stream(4 * 16, seed=5).view(4, 16)

    def fixed(train_ids, seq_len, batch_size, seed, step, micro, rank=0, world_size=1):
        # the same 4 windows every step: all at once, or 2 per micro-batch
        return windows[micro * batch_size : (micro + 1) * batch_size]

    monkeypatch.setattr(distill, "training_batch", fixed)
    results = []
    for batch_size, accum in ((4, 1), (2, 2)):
        student = student_from_teacher_layers(teacher, [0, 3])
        opts = _options(steps=3, batch_size=batch_size, grad_accum=accum, max_grad_norm=0.05, lr=1e-2)
        report = distill_(student, teacher, opts, _stream(500, 1), None, 16, None, progress=False)
        results.append((student, report))
    (a, ra), (b, rb) = results
    assert ra["tokens_seen"] == rb["tokens_seen"]
    # same gradient (a mean over the 4 windows): same norm, same loss, same update
    assert rb["grad_norm_history"] == pytest.approx(ra["grad_norm_history"], rel=1e-4)
    assert rb["loss_history"] == pytest.approx(ra["loss_history"], rel=1e-5)
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.named_parameters(), b.parameters(), student0.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5, msg=name)
        moved = max(moved, (pa - p0).abs().max().item())
    assert moved > 1e-3  # training did move the weights


def test_gradient_clipping_is_applied(pair):
    teacher, _ = pair
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g) for any reasonable gradient, so
    # clipping to a norm far below eps shrinks the update by orders of magnitude.
    deltas, norms = [], []
    for max_norm in (1e3, 1e-10):
        student = student_from_teacher_layers(teacher, [0, 3])
        before = student.model.layers[0].mlp.up_proj.weight.clone()
        report = distill_(student, teacher, _options(steps=1, warmup_steps=0, max_grad_norm=max_norm, lr=1e-3),
                          _stream(500, 1), None, 16, None, progress=False)  # fmt: skip
        deltas.append((student.model.layers[0].mlp.up_proj.weight - before).abs().max().item())
        norms.append(report["grad_norm_history"][0])
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and norms[0] > 1e-6  # the norm before clipping
    assert deltas[0] == pytest.approx(1e-3, rel=0.05)
    assert deltas[1] < 1e-3 * deltas[0]


def test_half_precision_student_trains_in_float32_and_comes_back_half(pair):
    teacher, student = pair
    student.half()
    before = student.model.layers[1].mlp.up_proj.weight.clone()
    report = distill_(student, teacher, _options(steps=2, lr=1e-2), _stream(500, 1), None, 16, None, progress=False)
    assert all(p.dtype == torch.float16 for p in student.parameters())
    assert not torch.equal(before, student.model.layers[1].mlp.up_proj.weight)
    assert all(math.isfinite(x) for x in report["loss_history"])


def test_hidden_loss_compares_the_mapped_block_outputs(pair):
    teacher, _ = pair

    def first_hidden_loss(layer_map, kind="mse"):
        student = student_from_teacher_layers(teacher, [0, 3])
        opts = _options(steps=1, hidden_loss=kind, hidden_weight=1.0, layer_map=layer_map)
        report = distill_(student, teacher, opts, _stream(500, 1), None, 16, None, progress=False)
        return report["loss_parts"]["hidden"][0]  # measured before the first update

    # student block 0 is teacher block 0 with the same input: identical outputs
    assert first_hidden_loss({0: 0}) == 0.0
    assert first_hidden_loss({0: 0}, "cosine") == pytest.approx(0.0, abs=1e-6)
    # student block 1 (teacher's block 3, fed block 0's output) differs from teacher blocks 1 and 3
    assert first_hidden_loss({1: 1}) > 1e-6 and first_hidden_loss({1: 3}) > 1e-6
    assert first_hidden_loss({0: 0, 1: 3}) == pytest.approx(first_hidden_loss({1: 3}) / 2, rel=1e-5)


def test_training_batches_are_a_pure_function_of_seed_step_micro():
    ids = torch.arange(1000)
    a = training_batch(ids, 16, 3, seed=0, step=5, micro=1)
    assert a.shape == (3, 16) and torch.equal(a, training_batch(ids, 16, 3, seed=0, step=5, micro=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(3, 15, dtype=torch.long))  # contiguous windows
    assert not torch.equal(a, training_batch(ids, 16, 3, seed=0, step=5, micro=0))
    assert not torch.equal(a, training_batch(ids, 16, 3, seed=0, step=6, micro=1))
    assert not torch.equal(a, training_batch(ids, 16, 3, seed=1, step=5, micro=1))
    # with two processes each takes its slice of one draw; rank 0 of 1 is the whole draw
    both = training_batch(ids, 16, 6, seed=0, step=5, micro=1)
    halves = [training_batch(ids, 16, 3, seed=0, step=5, micro=1, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), both)


# ----------------------------------------------------------------------------- resume after kill -9
CHILD = """
import json, os, sys, time
import torch
sys.path.insert(0, {tests!r})
from conftest import make_tiny_llama
from compressor.distill import distill_, student_from_teacher_layers
from compressor.distill import DistillStage

torch.set_num_threads(int(os.environ["DISTILL_TEST_THREADS"]))
d = {tmp!r}
teacher = make_tiny_llama(vocab_size=512, num_hidden_layers=4, attention_dropout=0.1)
teacher.load_state_dict(torch.load(d + "/teacher.pt"))
student = student_from_teacher_layers(teacher, [0, 3])
student.load_state_dict(torch.load(d + "/student.pt"))
delay = float(os.environ["DISTILL_TEST_SLEEP"])
student.register_forward_pre_hook(lambda module, args: time.sleep(delay))  # slow enough to be killed mid-run
options = DistillStage(**json.load(open(d + "/options.json")))
distill_(student, teacher, options, torch.load(d + "/train.pt"), torch.load(d + "/eval.pt"), 32,
         d + "/killed", progress=False)
print("FINISHED")
"""


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    # Attention dropout in the (training) student consumes the RNG, so the RNG state must be restored too.
    teacher = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4, attention_dropout=0.1)
    student = student_from_teacher_layers(teacher, [0, 3])
    with torch.no_grad():  # not just the teacher's layers: a student with its own weights
        g = torch.Generator().manual_seed(3)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    torch.save(student.state_dict(), tmp_path / "student.pt")
    torch.save(_stream(3000, seed=1), tmp_path / "train.pt")
    torch.save(_stream(200, seed=2), tmp_path / "eval.pt")
    options = _options(steps=12, grad_accum=2, seq_len=16, checkpoint_every=4, eval_every=4, eval_windows=2,
                       warmup_steps=3, weight_decay=0.01, hidden_loss="cosine", hidden_weight=0.1,
                       layer_map={1: 3})  # fmt: skip
    (tmp_path / "options.json").write_text(json.dumps(options.model_dump(mode="json")))

    def fresh():
        t = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4, attention_dropout=0.1)
        t.load_state_dict(torch.load(tmp_path / "teacher.pt"))
        s = student_from_teacher_layers(t, [0, 3])
        s.load_state_dict(torch.load(tmp_path / "student.pt"))
        return t, s

    def run(checkpoints, resume):
        t, s = fresh()
        report = distill_(s, t, options, torch.load(tmp_path / "train.pt"), torch.load(tmp_path / "eval.pt"), 32,
                          checkpoints, resume=resume, progress=False)  # fmt: skip
        return s, report

    straight, straight_report = run(tmp_path / "straight", resume=False)

    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD.format(tests=str(Path(__file__).parent), tmp=str(tmp_path))))
    env = dict(os.environ, DISTILL_TEST_SLEEP="0.15", DISTILL_TEST_THREADS=str(torch.get_num_threads()))
    child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / CHECKPOINT_NAME
    deadline = time.monotonic() + 120
    try:
        while not ckpt.exists():
            if child.poll() is not None:
                out, err = child.communicate()
                pytest.fail(f"the child ended (rc {child.returncode}) before any checkpoint:\n"
                            f"{out.decode()}\n{err.decode()[-3000:]}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 120 s")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL and b"FINISHED" not in out
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert killed_at in (4, 8), killed_at

    resumed, resumed_report = run(tmp_path / "killed", resume=True)  # starts from the initial student file
    assert resumed_report["resumed_from"] == killed_at
    assert straight_report["resumed_from"] is None
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_report["loss_history"] == straight_report["loss_history"]
    assert resumed_report["eval_history"] == straight_report["eval_history"]
    assert [s for s, _ in straight_report["eval_history"]] == [0, 4, 8, 12]
    assert resumed_report["final_eval"] == straight_report["final_eval"]
    assert straight_report["final_perplexity"] == straight_report["final_eval"]["perplexity"]
    assert straight_report["final_eval"]["windows"] == 200 // 32  # the final evaluation uses all windows
    # and the student really changed during those steps
    _, initial = fresh()
    assert not torch.equal(initial.model.layers[0].mlp.up_proj.weight, straight.model.layers[0].mlp.up_proj.weight)
    assert list((tmp_path / "killed").iterdir()) == [ckpt]  # one checkpoint, no temporary left behind


def test_resume_refuses_a_checkpoint_of_other_options(pair, tmp_path):
    teacher, student = pair
    opts = _options(steps=2, checkpoint_every=1)
    distill_(student, teacher, opts, _stream(500, 1), None, 16, tmp_path, progress=False)
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 2  # only the latest is kept
    with pytest.raises(UserError, match=r"^stages\[1\]\.distill: the checkpoint .* other lr"):
        distill_(student, teacher, opts.model_copy(update={"lr": 5e-4}), _stream(500, 1), None, 16, tmp_path,
                 resume=True, key="stages[1].distill", progress=False)  # fmt: skip
    # the evaluation cadence may change; a finished run resumes to its end without training
    report = distill_(student, teacher, opts.model_copy(update={"eval_every": 5}), _stream(500, 1), None, 16, tmp_path,
                      resume=True, progress=False)  # fmt: skip
    assert report["resumed_from"] == 2 and len(report["loss_history"]) == 2


# ----------------------------------------------------------------------------- errors
KEY = "stages[3].distill"


def _error(student, teacher, options, train_ids):
    with pytest.raises(UserError) as info:
        distill_(student, teacher, options, train_ids, None, 16, None, key=KEY, progress=False)
    message = str(info.value)
    assert message.startswith(KEY) and "\n" not in message
    return message


def test_error_student_larger_than_teacher(pair):
    teacher, student = pair
    assert "looks swapped" in _error(teacher, student, _options(), _stream(500, 1))


def test_error_unknown_layer_in_layer_map(pair):
    teacher, student = pair
    m = _error(student, teacher, _options(layer_map={2: 0}, hidden_loss="mse", hidden_weight=1.0), _stream(500, 1))
    assert "layer_map: student layer 2" in m and "2 layers" in m
    m = _error(student, teacher, _options(layer_map={1: 4}, hidden_loss="mse", hidden_weight=1.0), _stream(500, 1))
    assert "layer_map: teacher layer 4" in m and "4 layers" in m
    m = _error(student, teacher, _options(layer_map={0: -1}), _stream(500, 1))  # also without a hidden loss
    assert "teacher layer -1" in m


def test_error_different_vocabularies(pair):
    teacher, _ = pair
    student = make_tiny_llama(vocab_size=256, num_hidden_layers=1)
    assert "different vocabularies" in _error(student, teacher, _options(), _stream(500, 1) % 256)


def test_error_too_little_data(pair):
    teacher, student = pair
    m = _error(student, teacher, _options(seq_len=16), _stream(16, 1))
    assert "seq_len" in m and "at least 17" in m
    distill_(student, teacher, _options(seq_len=16, steps=1), _stream(17, 1), None, 16, None, progress=False)  # enough


def test_temperature_zero_is_rejected_by_the_schema():
    with pytest.raises(RecipeError, match="temperature"):
        load_recipe(None, ["stages=[{distill: {temperature: 0}}]"])


# ----------------------------------------------------------------------------- student from layers
def test_student_from_teacher_layers(pair):
    teacher, student = pair
    assert len(teacher.model.layers) == 4 and teacher.config.num_hidden_layers == 4  # the teacher is untouched
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    for new, old in ((0, 0), (1, 3)):
        kept, original = student.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert kept.keys() == original.keys()
        for name in kept:
            assert torch.equal(kept[name], original[name]), name
        assert student.model.layers[new].mlp.up_proj.weight is not teacher.model.layers[old].mlp.up_proj.weight
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    assert student.config is not teacher.config

    # generation with a KV cache gives what recomputing the whole prefix gives
    prompt = _stream(8, seed=7).view(1, 8)
    with torch.no_grad():
        cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, student(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, ids)

    # per-layer config lists are filtered
    qwen_like = make_tiny_llama(vocab_size=VOCAB, num_hidden_layers=4)
    qwen_like.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert student_from_teacher_layers(qwen_like, [1, 2]).config.layer_types == ["sliding_attention", "full_attention"]

    with pytest.raises(UserError, match=r"^x\.keep_layers: .*layer\(s\) \[4\] do not exist"):
        student_from_teacher_layers(teacher, [0, 4], key="x")
    with pytest.raises(UserError, match=r"^x\.keep_layers: .*increasing"):
        student_from_teacher_layers(teacher, [3, 0], key="x")


def test_plot_distill_curves(tmp_path):
    report = {
        "steps": 3,
        "loss": "forward_kl",
        "loss_history": [1.0, 0.8, 0.7],
        "loss_parts": {"kd": [0.9, 0.7, 0.6], "lm": [1.1, 0.9, 0.8]},
        "loss_weights": {"kd": 0.5, "lm": 0.5},
        "eval_history": [[0, 20.0], [2, 15.0]],
        "eval_windows": 2,
        "final_perplexity": 14.0,
        "final_eval": {"perplexity": 14.0, "windows": 9},
    }
    path = plot_distill_curves(report, tmp_path / "curves.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
