"""Text for calibration and evaluation: where it comes from and how it becomes token ids.

A source (`data.calibration.source`, `data.evaluation.source`) is one of:

- `python-docs` (the default; offline): CPython's documentation topics, the dict
  `pydoc_data.topics.topics` that ships with every Python (~80 topics, ~465k characters).
  The split is deterministic and disjoint: sort the topic names, keep each distinct text once
  (some names alias the same text); text i (0-based in that order) is evaluation text when `i % PYTHON_DOCS_EVAL_EVERY == 0` (i % 5 == 0: 16 topics,
  ~17k SmolLM2 tokens, 8 windows of 2048 on Python 3.11), calibration text otherwise. The topics differ between Python versions, so
  compare python-docs perplexities measured under the same Python.
- `wikitext2`: `wikitext` / `wikitext-2-raw-v1` from the Hub. Rows are kept verbatim, blank
  rows included, so the joined text is exactly the one the GPTQ and AWQ papers score.
- `c4`: `allenai/c4`, English, one shard as in the GPTQ papers: train shard 0 for
  calibration, validation shard 0 for evaluation.
- another Hub dataset id (`name` or `owner/name`), read with `config`, `split` (slices such as
  `train[:2000]` work) and `text_field`. Hub sources need network or the local datasets cache.
- a local file: `.txt` is one document (the whole file; documents are joined with blank lines
  anyway, so splitting it would change nothing); `.jsonl` / `.json` / `.parquet` hold one
  document per row in the column `text_field`. `config` and `split` apply to Hub sources only.

Default splits: `train` for calibration; `test` for evaluation (`validation` for c4).
Documents are joined with "\\n\\n" and tokenized once, without special tokens. Blank documents
are skipped (wikitext2 excepted, see above), and at most MAX_CHARS characters are read: that
bounds tokenization time and memory on big sources such as a c4 shard, and is far more text
than a calibration set uses or a CPU can evaluate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from compressor.errors import UserError
from compressor.hub_ids import is_repo_id
from compressor.models import hub_reachable
from compressor.options import Options

Part = Literal["calibration", "evaluation"]

PYTHON_DOCS = "python-docs"
PYTHON_DOCS_EVAL_EVERY = 5  # every 5th sorted topic (i % 5 == 0) is evaluation text
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_CHARS = 20_000_000  # ~5M tokens; wikitext-2's train split (~11M characters) fits whole


# The recipe's `data.calibration` and `data.evaluation` options (compressor.recipe composes them).
class TextSource(Options):
    source: str = Field(
        "python-docs",
        description="`python-docs` (embedded CPython docs), `wikitext2`, `c4`, a Hub dataset id, "
        "or a local `.txt` / `.jsonl` / `.parquet` file.",
    )
    config: str | None = Field(None, description="Hub dataset configuration name (e.g. `wikitext-2-raw-v1`).")
    split: str | None = Field(
        None, description="Dataset split; default `train` for calibration and `test` for evaluation."
    )
    text_field: str = Field("text", description="Column holding the text in datasets and .jsonl/.parquet files.")


class CalibrationData(TextSource):
    samples: int = Field(64, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=8, description="Tokens per calibration sequence.")
    seed: int = Field(0, ge=0, description="Seed for choosing the calibration windows.")


class EvaluationData(TextSource):
    seq_len: int = Field(
        2048, ge=8, description="Perplexity window length, capped by the model's context length."
    )
    max_windows: int | None = Field(
        None, ge=1, description="Evaluate only the first N windows (default: all of them)."
    )
    batch_size: int = Field(1, ge=1, description="Windows per forward pass during evaluation.")
SEPARATOR = "\n\n"

# shorthand -> (Hub dataset, config, default split for calibration, for evaluation)
HUB_SHORTHANDS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test"),
    "c4": ("allenai/c4", "en", "train", "validation"),
}
# The GPTQ papers read one C4 shard per split instead of the whole 300 GB corpus.
C4_SHARDS = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
# Suffixes that mark a string as a file name rather than a Hub id, even when the file is missing.
_FILE_LIKE = FILE_SUFFIXES + (".csv", ".tsv", ".gz", ".zip", ".arrow", ".md", ".text", ".xml")


# ----------------------------------------------------------------------------- documents
def load_documents(spec: TextSource, part: Part) -> list[str]:
    """The documents of one source, in their stored order, blank ones skipped (not wikitext2)."""
    key = f"data.{part}"
    if spec.source == PYTHON_DOCS:
        docs = python_docs(part)
    elif spec.source in HUB_SHORTHANDS:
        docs = _hub_documents(spec, part, key)
        if spec.source == "wikitext2":
            return _take(docs, keep_blank=True)
    elif _looks_local(spec.source):
        docs = _local_documents(Path(spec.source).expanduser(), spec.text_field, key)
    elif is_repo_id(spec.source, owner_required=False):
        docs = _hub_documents(spec, part, key)
    else:
        raise UserError(
            f"{key}.source: {spec.source!r} is not a known source; expected {PYTHON_DOCS}, "
            f"{', '.join(HUB_SHORTHANDS)}, a Hub dataset id like owner/name, or a local "
            f"{'/'.join(FILE_SUFFIXES)} file"
        )
    return _take(docs, keep_blank=False)


def python_docs(part: Part) -> list[str]:
    """CPython's documentation topics of one part of the fixed split (see the module docstring)."""
    from pydoc_data.topics import topics

    # A few topic names alias the same text; keep each text once (at its first name) so no
    # text can land in both parts.
    unique = list(dict.fromkeys(topics[name] for name in sorted(topics)))
    want_eval = part == "evaluation"
    return [text for i, text in enumerate(unique) if (i % PYTHON_DOCS_EVAL_EVERY == 0) == want_eval]


def _take(docs, keep_blank: bool) -> list[str]:
    """Strings in order until MAX_CHARS characters; blank ones dropped unless keep_blank."""
    out, chars = [], 0
    for doc in docs:
        if not isinstance(doc, str) or (not keep_blank and not doc.strip()):
            continue
        if chars >= MAX_CHARS:
            break
        out.append(doc)
        chars += len(doc) + len(SEPARATOR)
    return out


def _looks_local(source: str) -> bool:
    # A Hub id has at most one "/" and no file suffix; anything else is meant as a path.
    path = Path(source).expanduser()
    return (
        path.exists()
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or path.suffix.lower() in _FILE_LIKE
    )


def _local_documents(path: Path, text_field: str, key: str) -> list:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"{key}.source: {str(path)!r}: unsupported file type {suffix or '(none)'!r}; use {', '.join(FILE_SUFFIXES)}")
    if not path.is_file():
        raise UserError(f"{key}.source: {str(path)!r}: file not found")
    if suffix == ".txt":
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as exc:
            raise UserError(f"{key}.source: {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    import datasets

    builder = "parquet" if suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise UserError(f"{key}.source: {str(path)!r} could not be read as {builder}: {_first_line(exc)}") from None
    return _column(ds, text_field, key, repr(str(path)))


def _hub_documents(spec: TextSource, part: Part, key: str) -> list:
    import datasets

    name, config, train_split, eval_split = HUB_SHORTHANDS.get(spec.source, (spec.source, None, "train", "test"))
    config = spec.config or config
    split = spec.split or (train_split if part == "calibration" else eval_split)
    kwargs = {}
    if spec.source == "c4":
        base = split.split("[")[0]  # "validation[:1100]" reads the validation shard
        if base not in C4_SHARDS:
            raise UserError(f"{key}.split: {split!r} is not a c4 split; use train or validation (one shard each)")
        if config != "en":
            raise UserError(f"{key}.config: c4 reads only the 'en' shards, not {config!r}")
        config, kwargs = None, {"data_files": {base: C4_SHARDS[base]}}
    if not datasets.config.HF_HUB_OFFLINE and not hub_reachable():
        raise UserError(
            f"{key}.source: {spec.source!r} needs the Hugging Face Hub, which cannot be reached from this "
            f"machine (set HF_HUB_OFFLINE=1 to use a local datasets cache); use {PYTHON_DOCS} or a local "
            ".txt/.jsonl/.parquet file"
        )
    try:
        ds = datasets.load_dataset(name, config, split=split, **kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        offline = datasets.config.HF_HUB_OFFLINE and isinstance(exc, ConnectionError)
        why = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(
            f"{key}.source: {spec.source!r} could not be loaded from the Hugging Face Hub ({why}); "
            f"use {PYTHON_DOCS} or a local .txt/.jsonl/.parquet file"
        ) from None
    return _column(ds, spec.text_field, key, repr(spec.source))


def _column(ds, text_field: str, key: str, where: str) -> list:
    if text_field not in ds.column_names:
        raise UserError(f"{key}.text_field: no column {text_field!r} in {where}; its columns are: {', '.join(ds.column_names)}")
    return ds[text_field]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -------------------------------------------------------------------------------- tokens
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_TOKEN_CACHE_SIZE = 4  # the pipeline asks for calibration and evaluation, sometimes twice


def token_ids(tokenizer, spec: TextSource, part: Part) -> torch.Tensor:
    """All documents joined with blank lines, tokenized once without special tokens: [T] int64.

    Cached per process on (source, config, split, text_field, part, tokenizer); a local file's
    size and mtime are part of the key so an edited file is read again.
    """
    path = Path(spec.source).expanduser()
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    key = (spec.source, spec.config, spec.split, spec.text_field, part, tokenizer.name_or_path, len(tokenizer), stamp)
    if key not in _TOKEN_CACHE:
        text = SEPARATOR.join(load_documents(spec, part))
        # verbose=False: the whole corpus is longer than the model's context on purpose.
        ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
        if len(_TOKEN_CACHE) >= _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.pop(next(iter(_TOKEN_CACHE)))
        _TOKEN_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    return _TOKEN_CACHE[key].clone()  # callers may write into it


def calibration_batch(tokenizer, spec: CalibrationData) -> torch.Tensor:
    """`spec.samples` windows of `spec.seq_len` tokens at random offsets: [samples, seq_len] int64.

    Offsets are uniform over the tokenized calibration text (a window may overlap another) and
    come from a generator seeded by `spec.seed`, so the same spec gives the same tensor.
    """
    ids = token_ids(tokenizer, spec, "calibration")
    if ids.numel() < spec.seq_len + 1:
        raise UserError(
            f"data.calibration.seq_len: {spec.seq_len} is longer than the calibration text "
            f"({spec.source!r} has {ids.numel()} tokens); lower it or use more text"
        )
    gen = torch.Generator().manual_seed(spec.seed)
    starts = torch.randint(0, ids.numel() - spec.seq_len, (spec.samples,), generator=gen)
    return torch.stack([ids[s : s + spec.seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, spec: EvaluationData) -> torch.Tensor:
    """The whole evaluation text as one token stream: [T] int64 (windowing is perplexity's job)."""
    return token_ids(tokenizer, spec, "evaluation")
