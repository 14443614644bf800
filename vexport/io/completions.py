"""Completion batches: deferred completions and end-of-batch hooks.

Theory of operation
-------------------
I/O completes in batches: an engine's eventfd handler delivers every finished request at
once, and completions a node decides without I/O (null drivers, refused requests) are
deferred to the next loop iteration and delivered together.  Consumers such as the VDUSE
device want to act once per batch, not once per request (one interrupt per queue per
batch) and *in the same loop iteration* (no extra wake-up, which at queue depth 1 is a
good part of the latency).  So whoever delivers a batch brackets it with `begin()` /
`end()`; the outermost `end()` runs the registered hooks.  Code that completes requests
outside any batch can ask `in_batch()` and fall back to ``loop.call_soon``.

Everything here runs in the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("vexport.io")

Hook = Callable[[], None]
Done = Callable[[int], object]

_hooks: list[Hook] = []
_depth = 0


def add_hook(hook: Hook) -> None:
    if hook not in _hooks:
        _hooks.append(hook)


def remove_hook(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def in_batch() -> bool:
    return _depth > 0


def begin() -> None:
    global _depth
    _depth += 1


def end() -> None:
    """Close a batch; the outermost one runs every hook."""
    global _depth
    _depth -= 1
    if _depth == 0:
        for hook in list(_hooks):
            try:
                hook()
            except Exception:
                log.exception("completion batch hook failed")


class _Deferred:
    """Completions to deliver in the next loop iteration, all in one callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[Done, int]] = []

    def add(self, done: Done, ret: int) -> None:
        pending = self.pending
        pending.append((done, ret))
        if len(pending) == 1:
            self.loop.call_soon(self.run)

    def run(self) -> None:
        batch, self.pending = self.pending, []
        begin()
        try:
            for done, ret in batch:
                try:
                    done(ret)
                except Exception as e:
                    self.loop.call_exception_handler(
                        {"message": "exception in I/O completion callback", "exception": e}
                    )
        finally:
            end()


_deferred: dict[asyncio.AbstractEventLoop, _Deferred] = {}


def defer(loop: asyncio.AbstractEventLoop, done: Done, ret: int) -> None:
    """Deliver ``done(ret)`` in the next iteration of ``loop``, batched with others."""
    d = _deferred.get(loop)
    if d is None:
        for old in [k for k in _deferred if k.is_closed()]:
            del _deferred[old]
        d = _deferred[loop] = _Deferred(loop)
    d.add(done, ret)
