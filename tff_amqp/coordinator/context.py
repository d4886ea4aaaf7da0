"""What both regimes' execution contexts share: starting and closing their
runtime, and the `set_*` functions that install a `create_*` function's
context as TFF's default (shaped like `tff.backends.native`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl

C = TypeVar("C", bound=context_base.SyncContext | context_base.AsyncContext)


class _Runtime(Protocol):
    async def ensure_started(self) -> None: ...
    async def close(self) -> None: ...


class RuntimeContext:
    """Mixin of an async context that runs on a lazily started runtime."""

    runtime: _Runtime

    async def start(self) -> None:
        """Connect and start the local worker now (otherwise done on first use),
        so an unreachable broker fails here rather than in the first call."""
        await self.runtime.ensure_started()

    async def close(self) -> None:
        await self.runtime.close()


def installing(create: Callable[..., C], kind: str) -> Callable[..., C]:
    """`set_*` of a `create_*` function: create the context and install it
    as TFF's default context."""

    @functools.wraps(create)
    def set_context(broker_url: str, **kwargs: Any) -> C:
        context = create(broker_url, **kwargs)
        context_stack_impl.context_stack.set_default_context(context)
        return context

    set_context.__name__ = set_context.__qualname__ = "set_" + create.__name__.removeprefix(
        "create_"
    )
    set_context.__doc__ = f"Create a {kind} and install it as TFF's default context."
    return set_context
