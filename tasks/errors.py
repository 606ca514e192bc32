"""The two kinds of failure: requests that can never succeed, and hiccups worth retrying."""

from __future__ import annotations


class DarkroomError(Exception):
    """Base of every error darkroom reports to a user as one clear line."""


class InvalidRequest(DarkroomError):
    """A request that can never succeed as written. Never retried; the message names the field.

    `field` is the dotted name of the offending field (``steps``, ``line 3: width``);
    `line` is the 1-based line of a prompt file when the request came from one.
    """

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None) -> None:
        self.field = field
        self.line = line
        self.reason = message
        where = []
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(field)
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class InvalidRequests(InvalidRequest):
    """Several invalid items at once (a prompt file with bad lines): every problem is listed."""

    def __init__(self, problems: list[InvalidRequest]) -> None:
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} invalid item(s):\n{shown}{more}")


class TransientError(DarkroomError):
    """Broker or storage trouble that may pass: retried with backoff."""


class ServiceUnavailable(DarkroomError):
    """Redis or storage cannot be reached from this process (a producer's view)."""
