"""A context manager that closes itself: ``with Thing(...) as t:`` calls ``t.close()`` at the end.

Shared by the blocking clients of the edges (the control client, the raw xenstore client, the
sandbox's connections), which otherwise each spelled out the same two methods."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Subclasses define `close`; entering returns the object itself."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
