"""Errors that reach the user as one line and a non-zero exit code.

`UserError` (exit 2) means the input was wrong: a recipe key, a path, a model that cannot be
loaded. Anything else that escapes is an internal failure (exit 1). The CLI prints either as
one line; `--debug` shows the traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong and what is allowed."""

    exit_code = 2


MAX_SHOWN_VALUE = 200  # characters of a bad value's repr shown in an error


class RecipeError(UserError):
    """One bad value in a recipe, located by file and key path."""

    def __init__(self, file: str, path: str, value: object, allowed: str):
        self.file, self.path, self.value, self.allowed = file, path, value, allowed
        where = f"{file}: " if file else ""
        shown = repr(value)
        if len(shown) > MAX_SHOWN_VALUE:  # one line, even for a value of megabytes
            shown = f"{shown[:MAX_SHOWN_VALUE]}... ({len(shown)} characters)"
        super().__init__(f"{where}{path}: {shown} is not allowed: {allowed}")


class ArtifactError(UserError):
    """An artifact on disk is missing pieces, corrupted or of an unknown format."""
