"""One registration shape for every name -> entry table (the idea of timm's ``_registry.py``):
methods, certifiers, architectures, inits, layer types, bound rules, datasets, augmentations.
Every list a user sees (CLI choices, help texts, error messages) is derived from a registry.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

from certnet.errors import UnknownNameError

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """Names -> entries in registration order. Registering a name twice warns (the later
    entry wins); looking up an unknown name raises :class:`UnknownNameError` with the close
    matches and the choices. ``registry[name] = entry`` registers and ``del registry[name]``
    (or ``pop``) removes, e.g. a temporary plugin in a test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            warnings.warn(f"{self.kind} {name!r} registered twice; the later one wins",
                          stacklevel=2)
        self._entries[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator(name)``: register the decorated object under ``name``."""
        return lambda entry: self.register(name, entry)

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        """The registered names (those whose entry satisfies ``where``), sorted."""
        return sorted(n for n, e in self._entries.items() if where is None or where(e))

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            near = difflib.get_close_matches(str(name), list(self._entries), 1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}{hint}; choose from "
                                   f"{self.names()}") from None

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
