"""Stage kinds: what a recipe's `stages` list can hold (see registry.py for the interface).

Importing this package registers the built-in kinds, in the order README's option table lists
them: quantize, prune, distill. A new kind is one module that calls `register_stage`.
"""

from compressor.stages.registry import (
    RecipeFacts,
    StageContext,
    StageKind,
    register_stage,
    stage_kind,
    stage_kinds,
    unregister_stage,
)
from compressor.stages import quantize, prune, distill  # noqa: E402,F401 - registers the built-in kinds

__all__ = ["distill", "prune", "quantize", "RecipeFacts", "StageContext", "StageKind", "register_stage", "stage_kind", "stage_kinds", "unregister_stage"]
