"""Policy errors: every problem found while building or loading a policy, with where it is.

A policy is validated as a whole; all problems are collected and raised together in one
`PolicyError`, so an operator fixes a file in one pass. Each `Problem` carries a format-neutral
`path` into the model (e.g. ``("vm_labels", 3, "cw_types", "bank-b")``) so a loader can turn
it into a file and line (TOML: `toml_format`; Xen ACM XML: `acm_xml`).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

PathPart = str | int


@attrs.frozen
class Problem:
    """One thing wrong with a policy.

    `path` names the offending element in model terms (field names, tuple indexes, and the
    offending value where the field is a set); `file`/`line`/`column` are filled in by a loader
    that knows the source text.
    """

    message: str
    path: tuple[PathPart, ...] = ()
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def located(self, file: str | None, line: int | None, column: int | None = None) -> Problem:
        """The same problem with a source location."""
        return attrs.evolve(self, file=file, line=line, column=column)

    def __str__(self) -> str:
        where = self.file or "<policy>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


class PolicyError(ValueError):
    """A policy could not be built or loaded; nothing was loaded.

    `file`, `line` and `message` describe the first problem (sorted by line where known);
    `problems` holds all of them.
    """

    def __init__(self, problems: Iterable[Problem]) -> None:
        probs = tuple(problems)
        if not probs:
            raise ValueError("PolicyError needs at least one problem")
        self.problems: tuple[Problem, ...] = probs
        super().__init__("\n".join(str(p) for p in probs))

    @classmethod
    def single(
        cls,
        message: str,
        *,
        path: tuple[PathPart, ...] = (),
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> PolicyError:
        """Shortcut for an error with one problem."""
        return cls([Problem(message, path, file, line, column)])

    @property
    def file(self) -> str | None:
        return self.problems[0].file

    @property
    def line(self) -> int | None:
        return self.problems[0].line

    @property
    def message(self) -> str:
        return self.problems[0].message

    @property
    def messages(self) -> list[str]:
        """Every problem's message, in order (handy in tests and CLI output)."""
        return [p.message for p in self.problems]


class LabelSyntaxError(ValueError):
    """A label string is not of the form ``ACM:<policy>:<label>``."""
