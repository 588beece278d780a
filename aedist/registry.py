"""One registry per extension point (models, losses, corruptions, figures, metrics).

Each entry is declared next to its code with ``@REGISTRY.register("name", **meta)``; a duplicate
name is a programming error raised at import, an unknown name a user error listing what exists:

    @LOSSES.register("mse")
    def mse(pred, target): ...

    LOSSES.get("mse")            # the function
    LOSSES.get("msee")           # UserError: unknown loss 'msee'; did you mean 'mse'? (known: bce, mse)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from aedist.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; ``meta`` keyword arguments become attributes via ``wrap``."""

    def __init__(self, kind: str, wrap: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self._wrap = wrap
        self._entries: dict[str, T] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        """Decorator: add ``obj`` (wrapped with ``meta`` if the registry has a wrapper) under ``name``."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice; pick another name")
            self._entries[name] = self._wrap(name, obj, **meta) if self._wrap else obj
            return obj

        return add

    def get(self, name: str, key: str | None = None) -> T:
        """The entry called ``name``; ``key`` names the config key in the error."""
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            where = f"config key '{key}': " if key else ""
            raise UserError(f"{where}unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())
