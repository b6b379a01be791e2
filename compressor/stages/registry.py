"""What a stage kind is, and the table of them.

A stage kind is what a recipe's `stages` list can hold (`- quantize: {...}`): a name, the
pydantic model of its options, the checks it makes before any weights load, and `run`. The
recipe's stage list, `compress validate`'s summary and README's option table are all read from
this table, and `pipeline.run` calls `run` without knowing which kinds exist. Adding a kind is
one module that calls `register_stage` (compressor/stages/quantize.py is the example; a test
adds a toy kind from a test file).

The context a stage runs in (`StageContext`) carries what every stage may need (the model, its
tokenizer, the calibration and evaluation tokens, the device) and collects what the export
needs from the stages: the quantized weights and their grid, the sparsity, files to add to the
artifact and work to clean up after it is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel
from torch import nn

from compressor.engine import EngineOptions
from compressor.report import StageReport

# `recipe` below is a compressor.recipe.Recipe: the recipe composes its stage list from this
# table, so the table does not import it.


@dataclass
class RecipeFacts:
    """What a stage's `check` may look at before any weights load."""

    recipe: Any
    recipe_file: str
    config: Any  # the model's transformers config
    widths: dict[str, int]  # input width of every block linear (by module name) in the model as loaded


@dataclass
class StageContext:
    """The state `pipeline.run` threads through the stages (one per run)."""

    recipe: Any
    recipe_file: str
    model: nn.Module
    tokenizer: Any
    calibration_ids: torch.Tensor
    eval_ids: torch.Tensor | None
    device: torch.device
    progress: bool = True
    resume: bool = False
    input_model: nn.Module | None = None  # a copy of the model as it entered the pipeline, when a stage asked for it
    # Filled in by the stages, read by the export:
    quantized: dict[str, Any] = field(default_factory=dict)  # module name -> QuantizedWeight
    quantization: Any = None  # the grid of the quantized weights (a QuantizeStage: bits, group_size, sym, ...)
    sparsity: dict[str, Any] | None = None  # summary of the latest unstructured/N:M prune stage
    pruned_names: set[str] = field(default_factory=set)
    prune_skips: list[str] = field(default_factory=list)
    fused: dict[int, int] = field(default_factory=dict)  # stage index -> index of the stage that ran it
    artifact_writers: list[Callable[[Path], None]] = field(default_factory=list)  # add files to the artifact
    after_export: list[Callable[[], None]] = field(default_factory=list)  # once the artifact is complete

    def engine(self, desc: str) -> EngineOptions:
        """The layer-wise engine's options as the recipe's `compute` section sets them."""
        return EngineOptions(
            device=self.device,
            batch_size=self.recipe.compute.calibration_batch_size,
            max_activation_gb=self.recipe.compute.max_activation_gb,
            progress=self.progress,
            desc=desc,
        )


def _no_checks(facts: RecipeFacts, options: Any, index: int) -> list[str]:
    return []


@dataclass(frozen=True)
class StageKind:
    name: str  # the key in the recipe: `- NAME: {options}`
    options: type[BaseModel]  # its options (documented fields: README's table is generated from them)
    run: Callable[[StageContext, Any, int], StageReport]  # (context, options, stage index) -> its report
    # Checks before any weights load: raise RecipeError naming `stages[i]...`; return warnings.
    check: Callable[[RecipeFacts, Any, int], list[str]] = _no_checks
    summary: Callable[[Any], str] = lambda options: ""  # `compress validate`'s word for it: quantize(gptq)
    needs_input_model: Callable[[Any], bool] = lambda options: False  # keep a copy of the model before any stage
    reshapes_model: Callable[[Any], bool] = lambda options: False  # changes layer widths (structured pruning)
    # The grid (bits, group_size, sym, desc_act, static_groups, ...) of the weights the stage
    # quantizes, which the export formats are checked against before any work; None: it does not quantize.
    quantization: Callable[[Any], Any] = lambda options: None


_STAGE_KINDS: dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    """Add a stage kind to the table (a later registration of the same name replaces it)."""
    _STAGE_KINDS[kind.name] = kind
    return kind


def unregister_stage(name: str) -> None:
    _STAGE_KINDS.pop(name, None)


def stage_kind(name: str) -> StageKind:
    return _STAGE_KINDS[name]


def stage_kinds() -> dict[str, StageKind]:
    """name -> StageKind, in registration order (README's table follows it)."""
    return dict(_STAGE_KINDS)
