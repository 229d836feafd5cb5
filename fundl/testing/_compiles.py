"""Counting XLA compilations, to assert that a jitted step does not recompile."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Counts XLA compilations inside the ``with`` block.

    Yields a list that receives one entry per backend compilation; use it to assert that a
    jitted step does not recompile on its second call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fundl.testing import count_compiles
        >>> step = jax.jit(lambda x: x * 2)
        >>> _ = step(jnp.ones(3))
        >>> with count_compiles() as compiles:
        ...     _ = step(jnp.ones(3))
        >>> len(compiles)
        0
    """
    events: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs  # the listener's signature; only the event's name is counted
        if event == _COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
