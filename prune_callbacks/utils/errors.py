"""Errors that say which argument they are about, so callers map them without parsing messages;
and the argument check the engine and the callbacks share (`check_names`).

`about("flops")` tags every ValueError/TypeError raised inside the block with `.argument =
"flops"` (the innermost tag wins); `argument_of(exc)` reads it back. The app turns the argument
into its config key (`prune.flops`); a user sees the same message either way.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, TypeVar


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


def check_names(name: str, value: Any) -> List[str]:
    """Group names from a list, or from one name given as a str (never its characters).

    Raises:
        TypeError: `value` is not a str or an iterable of str (tagged with `name`).
    """
    if isinstance(value, str):
        return [value]
    try:
        names = list(value or ())
    except TypeError:
        raise tagged(name, TypeError(f"{name} must be a list of group names, got {value!r}")) from None
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise tagged(name, TypeError(f"{name} must hold group names (str), got {bad!r}"))
    return names
