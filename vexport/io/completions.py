"""Completion batches: deferred completions and end-of-batch hooks.

Theory of operation
-------------------
I/O completes in batches: an engine's eventfd handler delivers every finished request at
once, and completions a node decides without I/O (null drivers, refused requests) are
deferred and delivered together.  Consumers such as the VDUSE device want to act once
per batch, not once per request (one interrupt per queue per batch) and *in the same loop
iteration* (no extra wake-up, which at queue depth 1 is a good part of the latency).  So
whoever delivers a batch (`deliver`) or submits one (the VDUSE kick handler) brackets it
with `begin()` / `end()`; the outermost `end()` first delivers the completions deferred
during the batch (`defer`: a null node's requests complete in the iteration that submitted
them, yet never inside the submit call), then runs the registered hooks.  Outside any
batch, `defer` falls back to one ``loop.call_soon`` for everything deferred until it runs.

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
_hooks_snapshot: tuple[Hook, ...] = ()  # what end() runs (a hook may remove itself)
_depth = 0
_in_batch_deferred: list[tuple[Done, int]] = []
_pollers: list[Callable[[], bool]] = []


def add_hook(hook: Hook) -> None:
    global _hooks_snapshot
    if hook not in _hooks:
        _hooks.append(hook)
        _hooks_snapshot = tuple(_hooks)


def remove_hook(hook: Hook) -> None:
    global _hooks_snapshot
    if hook in _hooks:
        _hooks.remove(hook)
        _hooks_snapshot = tuple(_hooks)


def add_poller(poller: Callable[[], bool]) -> None:
    """``poller()`` delivers completions that are ready without waiting (an engine
    reading its completion ring) and says whether it found any; `poll` runs them."""
    if poller not in _pollers:
        _pollers.append(poller)


def remove_poller(poller: Callable[[], bool]) -> None:
    if poller in _pollers:
        _pollers.remove(poller)


def poll() -> bool:
    """Run every poller (for a device that polls instead of sleeping); True if any
    delivered completions."""
    found = False
    for poller in _pollers:
        if poller():
            found = True
    return found


def in_batch() -> bool:
    return _depth > 0


def begin() -> None:
    global _depth
    _depth += 1


def end() -> None:
    """Close a batch; the outermost one delivers what was deferred, then runs every hook."""
    global _depth
    if _depth == 1:
        while _in_batch_deferred:  # completions may submit (and defer) more
            batch = _in_batch_deferred[:]
            _in_batch_deferred.clear()
            _call_each(batch)
    _depth -= 1
    if _depth == 0:
        for hook in _hooks_snapshot:
            try:
                hook()
            except Exception:
                log.exception("completion batch hook failed")


def _call_each(batch: list[tuple[Done, int]]) -> None:
    for done, ret in batch:
        try:
            done(ret)
        except Exception as e:
            _report(e)


def _report(e: Exception) -> None:
    # No local holds the context: a frame -> dict -> exception -> traceback -> frame cycle
    # would keep the batch's buffers alive until a garbage collection.
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        log.error("exception in I/O completion callback", exc_info=e)
        return
    loop.call_exception_handler({"message": "exception in I/O completion callback", "exception": e})


def deliver(batch: list[tuple[Done, int]]) -> None:
    """Run ``done(ret)`` for every pair, as one batch."""
    if _depth:  # inside a batch already: it closes later (_call_each, inlined)
        for done, ret in batch:
            try:
                done(ret)
            except Exception as e:
                _report(e)
        return
    begin()
    try:
        _call_each(batch)
    finally:
        end()


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
        deliver(batch)


_deferred: dict[asyncio.AbstractEventLoop, _Deferred] = {}


def defer(loop: asyncio.AbstractEventLoop, done: Done, ret: int) -> None:
    """Deliver ``done(ret)`` at the end of the current batch, or if there is none in the
    next iteration of ``loop``, batched with others."""
    if _depth:
        _in_batch_deferred.append((done, ret))
        return
    d = _deferred.get(loop)
    if d is None:
        for old in [k for k in _deferred if k.is_closed()]:
            del _deferred[old]
        d = _deferred[loop] = _Deferred(loop)
    d.add(done, ret)


def reset_after_fork() -> None:
    """In a forked queue worker: drop the parent's hooks, pollers and pending batches
    (they belong to the parent's device and engines and its event loop)."""
    global _depth, _hooks_snapshot
    _hooks.clear()
    _hooks_snapshot = ()
    _pollers.clear()
    _in_batch_deferred.clear()
    _deferred.clear()
    _depth = 0
