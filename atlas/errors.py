"""Errors that name the file at fault and the fix, so a lab can correct its upload."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input.

    Attributes
    ----------
    file : str
        Path of the offending file, relative to the slide (or as given).
    message : str
        What is wrong, with the bad value.
    fix : str
        What the uploader should do about it.
    """

    file: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message} -- fix: {self.fix}"


class InvalidInput(ValueError):
    """Raised when inputs fail validation; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
