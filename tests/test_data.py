"""Text sources and token windows: the python-docs split, calibration windows, local files, errors."""

from __future__ import annotations

import json
import time

import pytest
import torch

from compressor import data
from compressor.data import calibration_batch, evaluation_tokens, load_documents
from compressor.errors import UserError
from compressor.data import CalibrationData, EvaluationData, TextSource


def test_python_docs_split_is_disjoint_deterministic_and_complete():
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = load_documents(TextSource(), "calibration")
    evals = load_documents(TextSource(), "evaluation")
    assert calib == load_documents(TextSource(), "calibration")
    assert evals == load_documents(TextSource(), "evaluation")
    # Every topic lands in exactly one part, in sorted-name order, every 5th one in evaluation.
    unique = list(dict.fromkeys(topics[n] for n in names))  # some names alias one text
    assert sorted(calib + evals) == sorted(set(topics.values()))
    assert evals == unique[0::5]
    assert calib == [t for i, t in enumerate(unique) if i % 5 != 0]
    assert not set(calib) & set(evals)


def test_calibration_batch_shape_seed_and_contiguous_windows(smollm2_tokenizer):
    spec = CalibrationData(samples=8, seq_len=32, seed=3)
    batch = calibration_batch(smollm2_tokenizer, spec)
    assert batch.shape == (8, 32) and batch.dtype == torch.long
    data._TOKEN_CACHE.clear()  # the same spec must give the same tensor in a fresh process too
    assert torch.equal(batch, calibration_batch(smollm2_tokenizer, spec))
    assert not torch.equal(batch, calibration_batch(smollm2_tokenizer, spec.model_copy(update={"seed": 4})))

    text = "\n\n".join(load_documents(spec, "calibration"))
    full = torch.tensor(smollm2_tokenizer(text, add_special_tokens=False)["input_ids"])
    slices = full.unfold(0, 32, 1)  # every contiguous 32-token slice
    for row in batch:
        assert (slices == row).all(dim=1).any(), "a calibration window is not a slice of the text"


def test_evaluation_tokens_are_the_joined_documents(smollm2_tokenizer):
    ids = evaluation_tokens(smollm2_tokenizer, EvaluationData())
    text = "\n\n".join(load_documents(EvaluationData(), "evaluation"))
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.numel() > 3 * 2048  # a few 2048-token windows for the default evaluation


def test_local_txt_jsonl_json_parquet(tmp_path, smollm2_tokenizer):
    import datasets

    txt = tmp_path / "doc.txt"
    txt.write_text("first paragraph\n\nsecond paragraph\n")
    assert load_documents(TextSource(source=str(txt)), "calibration") == ["first paragraph\n\nsecond paragraph\n"]

    rows = [{"body": "alpha beta", "n": 1}, {"body": "", "n": 2}, {"body": "gamma", "n": 3}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents(TextSource(source=str(jsonl), text_field="body"), "evaluation") == ["alpha beta", "gamma"]

    js = tmp_path / "docs.json"
    js.write_text(json.dumps(rows))
    assert load_documents(TextSource(source=str(js), text_field="body"), "evaluation") == ["alpha beta", "gamma"]

    pq = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": ["one", "  ", "two"], "id": [1, 2, 3]}).to_parquet(str(pq))
    assert load_documents(TextSource(source=str(pq)), "calibration") == ["one", "two"]

    ids = evaluation_tokens(smollm2_tokenizer, EvaluationData(source=str(pq)))
    assert ids.tolist() == smollm2_tokenizer("one\n\ntwo", add_special_tokens=False)["input_ids"]


def test_edited_local_file_is_read_again(tmp_path, smollm2_tokenizer):
    txt = tmp_path / "doc.txt"
    txt.write_text("one two three")
    before = evaluation_tokens(smollm2_tokenizer, EvaluationData(source=str(txt)))
    txt.write_text("one two three four five six")
    after = evaluation_tokens(smollm2_tokenizer, EvaluationData(source=str(txt)))
    assert after.numel() > before.numel()


def test_calibration_text_shorter_than_seq_len(tmp_path, smollm2_tokenizer):
    txt = tmp_path / "short.txt"
    txt.write_text("only a few words here")
    with pytest.raises(UserError, match=r"data\.calibration\.seq_len: 64 .* has \d+ tokens"):
        calibration_batch(smollm2_tokenizer, CalibrationData(source=str(txt), seq_len=64))


def test_local_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"data\.calibration\.source: .*missing\.txt': file not found"):
        load_documents(TextSource(source=str(tmp_path / "missing.txt")), "calibration")

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(UserError, match=r"data\.evaluation\.text_field: no column 'text' .*columns are: body, id"):
        load_documents(TextSource(source=str(jsonl)), "evaluation")

    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(UserError, match=r"data\.evaluation\.source: .*'\.csv'.*\.txt, \.jsonl, \.json, \.parquet"):
        load_documents(TextSource(source=str(csv)), "evaluation")

    with pytest.raises(UserError, match=r"data\.evaluation\.source: .* not a known source"):
        load_documents(TextSource(source="not a dataset!"), "evaluation")


@pytest.mark.parametrize("source", ["wikitext2", "someone/some-dataset"])
def test_hub_source_offline_fails_fast(monkeypatch, source):
    import datasets
    import huggingface_hub

    # datasets and huggingface_hub read HF_HUB_OFFLINE once, at import; set their copies too,
    # or the first request retries the unreachable Hub for ~25 s before giving up.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        load_documents(TextSource(source=source), "evaluation")
    assert time.monotonic() - start < 10
    msg = str(err.value)
    assert msg.startswith(f"data.evaluation.source: {source!r} could not be loaded from the Hugging Face Hub (")
    assert "python-docs" in msg and "\n" not in msg
