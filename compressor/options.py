"""The base of every options model (recipe sections and stage options)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
