"""``Delegated``: an attribute that a class keeps in one of its parts, read and written through."""

from __future__ import annotations

from typing import Generic, TypeVar, overload

T = TypeVar("T")


class Delegated(Generic[T]):
    """``timeline: Delegated[int] = Delegated("ledger")`` on a class makes ``obj.timeline`` read and write
    ``obj.ledger.timeline``: the attribute keeps its name for callers after its state moved to a part."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> Delegated[T]: ...

    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...

    def __get__(self, obj: object | None, objtype: type | None = None) -> Delegated[T] | T:
        if obj is None:
            return self
        value: T = getattr(getattr(obj, self.part), self.name)
        return value

    def __set__(self, obj: object, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)
