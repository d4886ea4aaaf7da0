"""Lexical scopes for resolving references while evaluating a computation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from tff_amqp.coordinator.stateful.values import CoordinatorValue

_Binding = Union["CoordinatorValue", "asyncio.Task[CoordinatorValue]"]


class Scope:
    """An immutable linked scope. A binding may still be computing (a task):
    block locals run concurrently, and a reference waits for its local."""

    __slots__ = ("_name", "_parent", "_value")

    def __init__(
        self, name: str | None = None, value: _Binding | None = None, parent: Scope | None = None
    ) -> None:
        self._name = name
        self._value = value
        self._parent = parent

    def bind(self, name: str, value: _Binding) -> Scope:
        return Scope(name, value, self)

    async def lookup(self, name: str) -> CoordinatorValue:
        scope: Scope | None = self
        while scope is not None:
            if scope._name == name:
                value = scope._value
                if isinstance(value, Awaitable):
                    return await value
                assert value is not None
                return value
            scope = scope._parent
        raise NameError(f"reference {name!r} is not bound in this computation")

    def lookup_now(self, name: str) -> CoordinatorValue | None:
        """`lookup(name)` when its value is already there (None: await it)."""
        scope: Scope | None = self
        while scope is not None:
            if scope._name == name:
                value = scope._value
                if isinstance(value, asyncio.Future):
                    if not value.done() or value.cancelled() or value.exception() is not None:
                        return None
                    return value.result()
                if isinstance(value, Awaitable):
                    return None
                return value
            scope = scope._parent
        return None

    @property
    def is_empty(self) -> bool:
        return self._name is None and self._parent is None


EMPTY_SCOPE = Scope()
