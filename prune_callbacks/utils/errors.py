"""Errors that say which argument they are about, so callers map them without parsing messages.

`about("flops")` tags every ValueError/TypeError raised inside the block with `.argument =
"flops"` (the innermost tag wins); `argument_of(exc)` reads it back. The app turns the argument
into its config key (`prune.flops`); a user sees the same message either way.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, TypeVar


@contextlib.contextmanager
def about(argument: str) -> Iterator[None]:
    """Tag ValueError/TypeError raised in the block as being about `argument` (unless tagged).

    Examples:
        >>> with about("flops"):
        ...     check_fraction(flops, "flops")
    """
    try:
        yield
    except (ValueError, TypeError) as e:
        if getattr(e, "argument", None) is None:
            e.argument = argument  # type: ignore[attr-defined]
        raise


def argument_of(exc: BaseException) -> Optional[str]:
    """The argument `exc` was tagged with by `about`, or None."""
    return getattr(exc, "argument", None)


E = TypeVar("E", bound=BaseException)


def tagged(argument: str, exc: E) -> E:
    """`exc`, tagged as being about `argument`: `raise tagged("flops", ValueError(...))`."""
    exc.argument = argument  # type: ignore[attr-defined]
    return exc
