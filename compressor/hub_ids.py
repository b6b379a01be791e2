"""The Hugging Face Hub's repository id rule, one copy for every place that reads an id: the
recipe (`model.source`, `push.repo`), data sources, and `compress push` (which used to refuse,
after a whole run, ids that the recipe had accepted).

The rule is huggingface_hub's own `validate_repo_id` (letters, digits, '-', '_', '.'; at most 96
characters a part; no '--' or '..'; not ending in '.' or '-'), plus, where an owner is required,
exactly one '/'.
"""

from __future__ import annotations


def is_repo_id(text: str, owner_required: bool = True) -> bool:
    """Whether `text` is a Hub repository id (`owner/name`, or also a bare `name` when allowed)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(text, str) or (owner_required and text.count("/") != 1):
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True
