"""Named extension points: one small registry per kind of thing a user can add (scoring rules, baselines, datasets).

A registry maps a name to an entry that carries everything the package needs to know about it, so code asks the
entry (``BASELINE_REGISTRY.get(name).takes_tau``) instead of comparing names, and the CLI choices, the API's
validation and the names written to JSON all come from :meth:`Registry.names`. This module imports nothing
from the package, so every layer can own a registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import overload

__all__ = ["Registry"]


class Registry[T]:
    """Entries of one kind by name, in registration order (built-ins first).

    ``kind`` names the entries in messages (``"unknown baseline 'x'; choose one of ce, ..."``). Aliases are extra
    names that :meth:`get` resolves to their entry; :meth:`names` lists only the canonical names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    @overload
    def register(self, name: str, entry: T, *, aliases: tuple[str, ...] = (), replace: bool = False) -> T: ...

    @overload
    def register(
        self, name: str, entry: None = None, *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> Callable[[T], T]: ...

    def register(
        self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = (), replace: bool = False
    ) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name`` (and ``aliases``) and return it; without ``entry``, a decorator that does so.

        A name that is taken is refused unless ``replace=True``, so that two extensions cannot silently shadow
        each other (or a built-in).
        """
        if entry is None:
            return lambda e: self.register(name, e, aliases=aliases, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        for key in (name, *aliases):
            taken = key in self._entries or key in self._aliases
            if taken and not replace:
                raise ValueError(f"{self.kind} {key!r} is already registered; pass replace=True to replace it")
        self._entries[name] = entry
        for alias in aliases:
            self._aliases[alias] = name
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (tests and notebooks that register temporary entries)."""
        self.get(name)
        canonical = self.canonical(name)
        del self._entries[canonical]
        self._aliases = {a: n for a, n in self._aliases.items() if n != canonical}

    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (itself, or the entry an alias points to)."""
        if isinstance(name, str):  # an unhashable name (a list) is unknown, not a TypeError
            if name in self._entries:
                return name
            if name in self._aliases:
                return self._aliases[name]
        raise self.unknown(name)

    def unknown(self, name: object) -> ValueError:
        """The one-line error for a name no entry answers to, naming the known ones (for callers that look a name
        up their own way first, e.g. case-insensitively)."""
        return ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")

    def get(self, name: str) -> T:
        """The entry of ``name`` (or of an alias). An unknown name raises a plain ValueError, as the package's other
        refusals of a bad value do, in one line: ``unknown <kind> 'x'; choose one of a, b, c``."""
        return self._entries[self.canonical(name)]

    def names(self) -> tuple[str, ...]:
        """The canonical names, in registration order: what CLI choices and error messages list."""
        return tuple(self._entries)

    def items(self) -> tuple[tuple[str, T], ...]:
        """``(name, entry)`` pairs in registration order."""
        return tuple(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
