"""One helper that turns an unknown name into an error listing the valid choices."""

from __future__ import annotations

import difflib
from typing import Mapping, TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, what: str) -> T:
    """Return ``table[name]`` or raise a ValueError naming the nearest valid choices."""
    if name in table:
        return table[name]
    near = difflib.get_close_matches(name, list(table), n=3)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise ValueError(f"unknown {what} {name!r}; choose one of: {', '.join(sorted(table))}.{hint}")
