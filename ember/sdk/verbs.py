"""Verbs callable on the class with a sandbox id and on an instance without one.

``await AsyncSandbox.kill("sb-1234")`` and ``await sb.kill()``, ``Sandbox.pause(id)`` and
``sb.pause()``, as E2B's SDK has them: what the CLI and scripts need without connecting
first. The instance form calls the instance's ``_<verb>_self``; the class form calls the
class's ``_<verb>_id``.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar, overload

from ember.paths import Paths

R_co = TypeVar("R_co", covariant=True)
V = TypeVar("V")


class SyncVerb(Protocol[R_co]):
    @overload
    def __call__(self) -> R_co: ...

    @overload
    def __call__(self, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> R_co: ...

    def __call__(self, sandbox_id: str | None = None, *, paths: Paths | None = None,
                 url: str | None = None, api_key: str | None = None) -> R_co: ...


class AsyncVerb(Protocol[R_co]):
    @overload
    def __call__(self) -> Coroutine[Any, Any, R_co]: ...

    @overload
    def __call__(self, sandbox_id: str, *, paths: Paths | None = None, url: str | None = None,
                 api_key: str | None = None) -> Coroutine[Any, Any, R_co]: ...

    def __call__(self, sandbox_id: str | None = None, *, paths: Paths | None = None,
                 url: str | None = None,
                 api_key: str | None = None) -> Coroutine[Any, Any, R_co]: ...


class ByIdOrSelf(Generic[V]):
    """The descriptor behind such a verb (typed as ``V``, a :class:`SyncVerb` or the
    coroutine variant the async class declares)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: object | None, owner: type) -> V:
        if obj is None:
            fn: Any = getattr(owner, f"_{self._name}_id")
        else:
            fn = getattr(obj, f"_{self._name}_self")
        return fn  # type: ignore[no-any-return]


__all__ = ["AsyncVerb", "ByIdOrSelf", "SyncVerb"]
