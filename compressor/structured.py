"""Structured pruning: remove whole MLP channels, attention heads or decoder layers.

Unlike unstructured / N:M pruning (`compressor.algorithms.pruning`, which zeroes weights and keeps
every shape), this produces a smaller DENSE model: weights are sliced, the config is rewritten
(`intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim`,
`num_hidden_layers`, the per-layer lists), and the result is an ordinary checkpoint that plain
`transformers.AutoModelForCausalLM.from_pretrained` loads. Because the config holds ONE width per
kind, every layer loses the same number of channels / heads (uniform width); which ones is chosen
per layer from that layer's own scores.

Importance comes from one forward pass of the unpruned model over the calibration batch (forward
hooks; the forward stops at the final norm, so the LM head is never computed). The scores:

- MLP channels (`target: mlp_channels`). Minitron (Muralidharan et al., 2024, "Compact Language
  Models via Pruning and Knowledge Distillation") scores a neuron by the norm of its activation
  over the calibration tokens; for a gated MLP the neuron's activation is channel j of the
  down_proj input, a_j = act(gate(x))_j * up(x)_j. We multiply by the norm of the down_proj column
  that channel feeds (the weight factor of Wanda-sp, An et al., 2024, "Fluctuation-based Adaptive
  Structured Pruning for Large Language Models"):
      score_j = ||a_j||_2 * ||W_down[:, j]||_2
  Why the product: channel j adds the rank-1 term a_j W_down[:, j]^T to the MLP output over all
  tokens, whose Frobenius norm is exactly that product, so the score IS the size of what removing
  the channel deletes from the residual stream. The activation alone misses channels whose column
  is small (or zero) and whose removal therefore costs nothing.
  round(ratio * intermediate_size) channels (halves up) leave every layer: rows of gate_proj and
  up_proj (and their biases), columns of down_proj.

- Attention heads (`target: heads`), the same idea one level up (Minitron scores a head by the norm
  of its attention output): with A_h the head's slice of the o_proj input ([tokens, head_dim]) and
  W_h the o_proj columns it feeds, the head adds A_h W_h^T to the output, and
      score_h = ||A_h W_h^T||_F = sqrt(trace(W_h^T W_h  A_h^T A_h)),
  computed from the per-head Gram A_h^T A_h that a hook on o_proj accumulates. (||A_h|| alone
  cannot see a head whose o_proj columns are zero.) GQA-aware, two modes:
  - `heads_mode: query`: every key/value group loses q = round(ratio * heads_per_group) of its
    query heads, the lowest-scoring of that group (per layer). `num_attention_heads` shrinks,
    `num_key_value_heads` stays, and every group still has the same number of query heads, which
    GQA's repeat_kv layout (query head h reads kv head h // heads_per_group) requires.
  - `heads_mode: groups`: round(ratio * num_key_value_heads) whole key/value groups leave, scored
    by the sum of their query heads' scores, with all their query heads; both counts shrink.
  Sliced: q_proj rows (+ bias), k_proj/v_proj rows (+ biases; groups mode only), o_proj input
  columns. `head_dim` is unchanged and written explicitly into the config, since it no longer
  equals hidden_size / num_attention_heads.

- Decoder layers (`target: layers`): Block Influence of ShortGPT (Men et al., 2024, "ShortGPT:
  Layers in Large Language Models are More Redundant Than You Expect"):
      BI_i = 1 - mean over calibration tokens of cos(h_i, h_{i+1})
  with h_i block i's input and h_{i+1} its output. A block that barely turns the hidden state does
  little; the `count` blocks with the lowest BI are removed in one shot (all BI measured on the
  unpruned model, as in the paper). The remaining attention modules get consecutive `layer_idx`
  (the KV cache is indexed by it) and the per-layer config lists (`layer_types`, ...) are filtered.

Ties in scores go to the lower index (stable sort), so results are deterministic. Embeddings, the
LM head and the norms are never touched: tied embeddings stay tied, and the dtype is kept.
`skip` (module-name globs) protects layers from `target: layers`; for channels/heads it cannot
exempt a layer (uniform width), so a pattern that matches a pruned linear is an error.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compressor.architectures import Architecture, architecture_of
from compressor.engine import auto_batch_size, is_skipped
from compressor.errors import UserError

# Config lists with one entry per decoder layer (filtered when layers are removed).
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")


# ----------------------------------------------------------------------------- pure functions
def removal_count(ratio: float, total: int) -> int:
    """round(ratio * total), halves up (as the unstructured pruners round)."""
    return math.floor(ratio * total + 0.5)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` lowest scores, ascending; ties go to the lower index."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[:count].tolist())


def kept(total: int, removed: list[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(total) if i not in gone]


def mlp_channel_scores(activation_sq: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """||a_j|| * ||W_down[:, j]||: `activation_sq` [I] is sum over tokens of a_j^2, `down_weight` [H, I]."""
    return activation_sq.clamp_min(0).sqrt() * down_weight.float().norm(dim=0)


def head_scores(gram: torch.Tensor, o_weight: torch.Tensor) -> torch.Tensor:
    """||A_h W_h^T||_F per head: `gram` [heads, d, d] = A_h^T A_h, `o_weight` [hidden, heads * d]."""
    heads, d, _ = gram.shape
    w = o_weight.float().reshape(o_weight.shape[0], heads, d)  # column h*d + i -> [:, h, i]
    wtw = torch.einsum("ohi,ohj->hij", w, w)  # W_h^T W_h, [heads, d, d]
    return (wtw * gram).sum(dim=(1, 2)).clamp_min(0).sqrt()  # trace(W^T W G), both symmetric


def block_influence(cosine_sum: float, tokens: int) -> float:
    """ShortGPT's BI = 1 - mean cosine similarity between a block's input and output."""
    return 1.0 - cosine_sum / max(tokens, 1)


def head_rows(heads: list[int], head_dim: int) -> list[int]:
    """Row (or column) indices of the given heads in a [heads * head_dim] projection."""
    return [h * head_dim + i for h in heads for i in range(head_dim)]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once


# ----------------------------------------------------------------------------- entry point
def prune_structured_(
    model: nn.Module,
    options,
    calibration_ids: torch.Tensor,
    key: str = "stages[i].prune",
    batch_size: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
    max_activation_gb: float = 6.0,
) -> dict[str, Any]:
    """Remove MLP channels, attention heads or decoder layers of `model` in place (see module doc).

    `options` is a `PruneStage` with method "structured"; `calibration_ids` is [samples, seq_len].
    The importance pass runs on `device` (default: where the model is; the model is moved back
    afterwards) with `batch_size` samples per forward (0: as many as `max_activation_gb` allows,
    as the layer-wise engine chooses). Returns a JSON-ready report: target, score, what was
    removed, the new config values, parameter counts before/after and an importance summary.
    """
    if options.method != "structured" or options.target not in ("mlp_channels", "heads", "layers"):
        raise UserError(
            f"{key}.target: structured pruning needs target mlp_channels, heads or layers, got {options.target!r}"
        )
    if calibration_ids.dim() != 2:
        raise ValueError(f"calibration_ids must be [samples, seq_len], got shape {tuple(calibration_ids.shape)}")
    arch = architecture_of(model)
    layout = _Layout.of(model, arch)
    before = parameter_count(model)
    start = time.perf_counter()
    batch_size = batch_size or auto_batch_size(model, *calibration_ids.shape, max_activation_gb)
    home = next(model.parameters()).device
    model.to(device if device is not None else home)
    try:
        prune = {"mlp_channels": _prune_mlp, "heads": _prune_heads, "layers": _prune_layers}[options.target]
        report = prune(model, arch, layout, options, calibration_ids, key, batch_size, progress)
    finally:
        model.to(home)
    after = parameter_count(model)
    return {
        "target": options.target,
        **report,
        "parameters": {"before": before, "after": after, "removed_fraction": round(1 - after / before, 6)},
        "calibration_tokens": int(calibration_ids.numel()),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ----------------------------------------------------------------------------- model layout
class _Layout:
    """The widths the config promises, checked against every block's linears."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @classmethod
    def of(cls, model: nn.Module, arch: Architecture) -> "_Layout":
        cfg = model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        layout = cls(layers=len(arch.block_list(model)), heads=heads, kv=kv, head_dim=head_dim,
                     intermediate=cfg.intermediate_size, hidden=cfg.hidden_size)  # fmt: skip
        expected = {
            "q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim, "o": heads * head_dim,
            "gate": layout.intermediate, "up": layout.intermediate, "down": layout.intermediate,
        }  # fmt: skip
        for i, block in enumerate(arch.block_list(model)):
            try:
                linears = _linears(block, arch)
            except AttributeError as exc:
                raise UserError(
                    f"model.source: structured pruning of {cfg.model_type!r} expects Llama-like blocks "
                    f"({exc}); set the module names in compressor/architectures.py"
                ) from None
            widths = {n: (m.in_features if n in ("o", "down") else m.out_features) for n, m in linears.items()}
            bad = {n: w for n, w in widths.items() if w != expected[n]}
            if bad or heads % kv:
                raise UserError(
                    f"model.source: layer {i} does not match its config (widths {bad}, expected "
                    f"{ {n: expected[n] for n in bad} }, heads {heads}, kv heads {kv}); structured pruning "
                    "needs the uniform layout the config describes"
                )
        return layout


def _linears(block: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    attn, mlp = block.get_submodule(arch.attention), block.get_submodule(arch.mlp)
    names = dict(zip(("q", "k", "v", "o"), arch.attention_projections))
    out = {short: attn.get_submodule(n) for short, n in names.items()}
    out.update({short: mlp.get_submodule(n) for short, n in zip(("gate", "up", "down"), arch.mlp_projections)})
    for short, m in out.items():
        if not isinstance(m, nn.Linear):
            raise AttributeError(f"{short} projection is {type(m).__name__}, not nn.Linear")
    return out


def _linear_names(arch: Architecture, index: int, part: str) -> list[str]:
    base = f"{arch.blocks}.{index}"
    if part == "mlp":
        return [f"{base}.{arch.mlp}.{n}" for n in arch.mlp_projections]
    return [f"{base}.{arch.attention}.{n}" for n in arch.attention_projections]


def _check_no_skip(arch: Architecture, layout: _Layout, options, key: str, part: str) -> None:
    """Uniform width: a layer cannot keep its full width, so `skip` must not match a sliced linear."""
    for i in range(layout.layers):
        for name in [f"{arch.blocks}.{i}"] + _linear_names(arch, i, part):
            for pattern in options.skip:
                if is_skipped(name, [pattern]):
                    raise UserError(
                        f"{key}.skip: {pattern!r} matches {name}, but structured {options.target} pruning "
                        "removes the same number from every layer (one config value); drop it from skip"
                    )


# ----------------------------------------------------------------------------- activations
class _Stop(Exception):
    pass


@torch.no_grad()
def _calibrate(model, arch, calibration_ids, batch_size, progress, desc, hooks: list[tuple[nn.Module, Callable, str]]):
    """Run the calibration batch through the model with the given hooks ("pre" or "post");
    the forward stops at the final norm (the LM head is not needed)."""
    device = next(model.parameters()).device
    handles = [
        module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn, with_kwargs=True)
        for module, fn, kind in hooks
    ]

    def stop(module, args):
        raise _Stop

    handles.append(model.get_submodule(arch.final_norm).register_forward_pre_hook(stop))
    was_training = model.training
    model.eval()
    try:
        starts = range(0, calibration_ids.shape[0], max(1, batch_size))
        for s in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            try:
                model(input_ids=calibration_ids[s : s + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


# ----------------------------------------------------------------------------- slicing
def _slice_linear_(linear: nn.Linear, dim: int, keep: list[int]) -> None:
    """Keep output rows (dim 0, with the bias) or input columns (dim 1) `keep` of a linear."""
    index = torch.tensor(keep, dtype=torch.long, device=linear.weight.device)
    w = linear.weight
    linear.weight = nn.Parameter(w.data.index_select(dim, index).contiguous(), requires_grad=w.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            b = linear.bias
            linear.bias = nn.Parameter(b.data.index_select(0, index).contiguous(), requires_grad=b.requires_grad)
        linear.out_features = len(keep)
    else:
        linear.in_features = len(keep)


def _config_error(config, changes: dict[str, Any]) -> str | None:
    """The validation error transformers would raise for `config` with `changes`, or None."""
    trial = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(trial, k, v)
    validate = getattr(trial, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as exc:  # strict-dataclass errors wrap the validator's ValueError
        cause = exc.__cause__ or exc
        return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return None


def _apply_config(model: nn.Module, changes: dict[str, Any]) -> None:
    for k, v in changes.items():
        setattr(model.config, k, v)


def _summary(values: torch.Tensor) -> dict[str, float]:
    v = values.float()
    return {"min": _r(v.min()), "median": _r(v.median()), "max": _r(v.max())}


def _r(x) -> float:
    x = float(x)
    return float(f"{x:.6g}")


# ----------------------------------------------------------------------------- MLP channels
def _prune_mlp(model, arch, layout, options, calibration_ids, key, batch_size, progress) -> dict:
    inter = layout.intermediate
    n = removal_count(options.ratio, inter)
    if not 0 < n < inter:
        raise UserError(
            f"{key}.ratio: {options.ratio:g} removes round({options.ratio:g} * {inter}) = {n} of the {inter} "
            f"MLP channels per layer; it must remove at least one and keep at least one "
            f"(ratio in [{0.5 / inter:.4g}, {(inter - 0.5) / inter:.4g}))"
        )
    _check_no_skip(arch, layout, options, key, "mlp")
    changes = {"intermediate_size": inter - n}
    if err := _config_error(model.config, changes):
        raise UserError(
            f"{key}.ratio: intermediate_size {inter - n} is rejected by {type(model.config).__name__}: {err}"
        )

    blocks = arch.block_list(model)
    down = [block.get_submodule(arch.mlp).get_submodule(arch.mlp_projections[2]) for block in blocks]
    sq = [torch.zeros(inter, dtype=torch.float32, device=d.weight.device) for d in down]

    def hook(i):
        def fn(module, args):
            x = args[0].float()
            sq[i].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0))

        return fn

    _calibrate(model, arch, calibration_ids, batch_size, progress, "importance (mlp channels)",
               [(d, hook(i), "pre") for i, d in enumerate(down)])  # fmt: skip

    removed, importance = {}, {}
    for i, block in enumerate(blocks):
        linears = _linears(block, arch)
        scores = mlp_channel_scores(sq[i], linears["down"].weight)
        gone = lowest(scores, n)
        keep = kept(inter, gone)
        _slice_linear_(linears["gate"], 0, keep)
        _slice_linear_(linears["up"], 0, keep)
        _slice_linear_(linears["down"], 1, keep)
        mlp = block.get_submodule(arch.mlp)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(keep)
        name = f"{arch.blocks}.{i}"
        removed[name] = gone
        total = float(scores.sum())
        share = float(scores[gone].sum()) / total if total else 0.0  # of the layer's summed importance
        importance[name] = {**_summary(scores), "removed_share": _r(share)}
    _apply_config(model, changes)
    return {
        "score": "||act(gate(x)) * up(x)||_2 * ||down_proj column||_2 per channel (Minitron x Wanda-sp)",
        "removed": removed,
        "config": changes,
        "importance": importance,
    }


# ----------------------------------------------------------------------------- heads
def _heads_plan(layout: _Layout, options, key: str) -> tuple[int, int, int]:
    """(query heads removed per group, groups removed, query heads per group)."""
    per_group = layout.heads // layout.kv
    if options.heads_mode == "query":
        q = removal_count(options.ratio, per_group)
        if per_group == 1:
            raise UserError(
                f"{key}.heads_mode: 'query' needs several query heads per key/value group, but this model has "
                f"{layout.heads} query heads for {layout.kv} key/value heads (1 per group); use heads_mode: groups"
            )
        if not 0 < q < per_group:
            raise UserError(
                f"{key}.ratio: {options.ratio:g} removes round({options.ratio:g} * {per_group}) = {q} of the "
                f"{per_group} query heads in each key/value group; it must remove at least one and keep at least "
                f"one (ratio in [{0.5 / per_group:.3g}, {(per_group - 0.5) / per_group:.3g}))"
            )
        return q, 0, per_group
    if layout.kv == 1:
        raise UserError(
            f"{key}.heads_mode: 'groups' removes whole key/value groups, but this model has a single key/value "
            "head (1 group); use heads_mode: query"
        )
    g = removal_count(options.ratio, layout.kv)
    if not 0 < g < layout.kv:
        raise UserError(
            f"{key}.ratio: {options.ratio:g} removes round({options.ratio:g} * {layout.kv}) = {g} of the "
            f"{layout.kv} key/value groups; it must remove at least one and keep at least one "
            f"(ratio in [{0.5 / layout.kv:.3g}, {(layout.kv - 0.5) / layout.kv:.3g}))"
        )
    return 0, g, per_group


def _heads_changes(layout: _Layout, q: int, g: int, per_group: int) -> dict[str, Any]:
    kv = layout.kv - g
    return {"num_attention_heads": kv * (per_group - q), "num_key_value_heads": kv, "head_dim": layout.head_dim}


def _prune_heads(model, arch, layout, options, calibration_ids, key, batch_size, progress) -> dict:
    q, g, per_group = _heads_plan(layout, options, key)
    _check_no_skip(arch, layout, options, key, "attention")
    changes = _heads_changes(layout, q, g, per_group)
    if err := _config_error(model.config, changes):
        # e.g. LlamaConfig insists hidden_size % num_attention_heads == 0 even with an explicit head_dim
        query = options.heads_mode == "query"
        units, n = (per_group, "query heads per group") if query else (layout.kv, "groups")
        plans = {r: (r, 0) if query else (0, r) for r in range(1, units)}
        works = [r for r, (rq, rg) in plans.items()
                 if not _config_error(model.config, _heads_changes(layout, rq, rg, per_group))]  # fmt: skip
        hint = ", ".join(f"{r / units:.3g} ({r} of {units} {n})" for r in works) or "none for this mode"
        raise UserError(
            f"{key}.ratio: {options.ratio:g} leaves {changes['num_attention_heads']} attention heads, which "
            f"{type(model.config).__name__} rejects ({err}), so the result would not load; ratios that load: {hint}"
        )

    blocks = arch.block_list(model)
    heads, d = layout.heads, layout.head_dim
    attns = [block.get_submodule(arch.attention) for block in blocks]
    o_projs = [a.get_submodule(arch.attention_projections[3]) for a in attns]
    grams = [torch.zeros(heads, d, d, dtype=torch.float32, device=o.weight.device) for o in o_projs]

    def hook(i):
        def fn(module, args):
            x = args[0].float().reshape(-1, heads, d)
            grams[i].add_(torch.einsum("nhd,nhe->hde", x, x))

        return fn

    _calibrate(model, arch, calibration_ids, batch_size, progress, "importance (heads)",
               [(o, hook(i), "pre") for i, o in enumerate(o_projs)])  # fmt: skip

    removed, importance = {}, {}
    for i, block in enumerate(blocks):
        linears = _linears(block, arch)
        scores = head_scores(grams[i], linears["o"].weight)
        by_group = scores.reshape(layout.kv, per_group)
        if options.heads_mode == "query":
            gone_groups: list[int] = []
            gone_heads = [grp * per_group + j for grp in range(layout.kv) for j in lowest(by_group[grp], q)]
        else:
            gone_groups = lowest(by_group.sum(dim=1), g)
            gone_heads = [grp * per_group + j for grp in gone_groups for j in range(per_group)]
        keep_heads = kept(heads, gone_heads)
        _slice_linear_(linears["q"], 0, head_rows(keep_heads, d))
        _slice_linear_(linears["o"], 1, head_rows(keep_heads, d))
        if gone_groups:
            keep_groups = kept(layout.kv, gone_groups)
            _slice_linear_(linears["k"], 0, head_rows(keep_groups, d))
            _slice_linear_(linears["v"], 0, head_rows(keep_groups, d))
        _set_head_attributes(attns[i], changes)
        name = f"{arch.blocks}.{i}"
        removed[name] = {"query_heads": gone_heads, "kv_groups": gone_groups}
        importance[name] = [_r(s) for s in scores.tolist()]
    _apply_config(model, changes)
    return {
        "score": "||head output @ its o_proj columns||_F per query head (Minitron head norm, o_proj-weighted); "
        + ("lowest per key/value group" if options.heads_mode == "query" else "group = sum of its query heads"),
        "heads_mode": options.heads_mode,
        "removed": removed,
        "config": changes,
        "importance": importance,
    }


def _set_head_attributes(attn: nn.Module, changes: dict[str, Any]) -> None:
    """The attention module caches head counts at construction; the forward reads some of them."""
    heads, kv = changes["num_attention_heads"], changes["num_key_value_heads"]
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = heads // kv  # repeat_kv / enable_gqa read this
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


# ----------------------------------------------------------------------------- layers
def _prune_layers(model, arch, layout, options, calibration_ids, key, batch_size, progress) -> dict:
    total, count = layout.layers, options.count
    if count >= total:
        raise UserError(
            f"{key}.count: {count} would remove {'all' if count == total else 'more than'} the model's "
            f"{total} decoder layers; at most {total - 1}"
        )
    protected = [
        i for i in range(total)
        if any(is_skipped(n, options.skip) for n in [f"{arch.blocks}.{i}"] + _linear_names(arch, i, "mlp")
               + _linear_names(arch, i, "attention"))
    ]  # fmt: skip
    if count > total - len(protected):
        raise UserError(
            f"{key}.count: {count} layers to remove but `skip` protects {len(protected)} of the {total} "
            f"(layers {protected}); at most {total - len(protected)}"
        )
    blocks = arch.block_list(model)
    cos_sum = [0.0] * total
    tokens = [0] * total

    def hook(i):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            cos_sum[i] += float(cos.sum())
            tokens[i] += cos.numel()

        return fn

    _calibrate(model, arch, calibration_ids, batch_size, progress, "importance (block influence)",
               [(b, hook(i), "post") for i, b in enumerate(blocks)])  # fmt: skip
    bi = torch.tensor([block_influence(cos_sum[i], tokens[i]) for i in range(total)], dtype=torch.float64)
    candidates = bi.clone()
    candidates[protected] = math.inf
    gone = lowest(candidates, count)
    keep = kept(total, gone)

    changes = keep_decoder_layers_(model, keep, f"{key}.count", f"the model without layers {gone}")
    return {
        "score": "ShortGPT block influence: 1 - mean cos(block input, block output) over calibration tokens",
        "removed": gone,
        "kept": keep,
        "config": changes,
        "importance": {"block_influence": [_r(v) for v in bi.tolist()], "protected": protected},
    }


def keep_decoder_layers_(model: nn.Module, keep: list[int], key: str, what: str) -> dict[str, Any]:
    """Keep only the decoder layers `keep` (increasing) of `model`, in place; return the config changes.

    Rewrites `num_hidden_layers` and the per-layer config lists (`layer_types`, ...) and renumbers
    each attention's `layer_idx` (its KV-cache slot) 0..n-1, so generation with a cache and
    save/load with plain transformers work. The new config is checked before anything changes.
    """
    arch = architecture_of(model)
    blocks = arch.block_list(model)
    total, config = len(blocks), model.config
    changes: dict[str, Any] = {"num_hidden_layers": len(keep)}
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == total:
            changes[name] = [values[i] for i in keep]
    if isinstance(getattr(config, "max_window_layers", None), int):
        # Qwen2/3: layers with index >= max_window_layers slide; count the kept ones below it
        changes["max_window_layers"] = sum(1 for i in keep if i < config.max_window_layers)
    if err := _config_error(config, changes):
        raise UserError(f"{key}: {what} is rejected by {type(config).__name__}: {err}")

    new_blocks = nn.ModuleList([blocks[i] for i in keep])
    for new_index, block in enumerate(new_blocks):
        for module in block.modules():  # attention's layer_idx indexes the KV cache
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent, _, attr = arch.blocks.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new_blocks)
    _apply_config(model, changes)
    if "layer_types" in changes:
        for module in model.modules():  # Qwen2/3 build a sliding mask only if some layer slides
            if isinstance(getattr(module, "has_sliding_layers", None), bool):
                module.has_sliding_layers = "sliding_attention" in changes["layer_types"]
    return changes
