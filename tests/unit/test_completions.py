"""Completion batches: deferred delivery and end-of-batch hooks (vexport/io/completions)."""

from __future__ import annotations

import asyncio

from vexport.io import completions


async def test_deferred_completions_are_one_batch_with_one_hook_call() -> None:
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, object]] = []

    def hook() -> None:
        seen.append(("hook", completions.in_batch()))

    completions.add_hook(hook)
    try:
        for i in range(5):
            completions.defer(loop, lambda ret, i=i: seen.append(("done", (i, ret))), -i)
        assert seen == []  # never synchronous
        await asyncio.sleep(0)
        assert seen == [("done", (i, -i)) for i in range(5)] + [("hook", False)]
    finally:
        completions.remove_hook(hook)


async def test_nested_batches_run_hooks_once_at_the_outermost_end() -> None:
    calls: list[int] = []
    completions.add_hook(lambda: calls.append(1))
    hook = completions._hooks[-1]
    try:
        assert not completions.in_batch()
        completions.begin()
        completions.begin()
        assert completions.in_batch()
        completions.end()
        assert calls == []
        completions.end()
        assert calls == [1]
    finally:
        completions.remove_hook(hook)


async def test_a_failing_callback_or_hook_does_not_stop_the_others() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict] = []  # type: ignore[type-arg]
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    got: list[int] = []

    def bad_hook() -> None:
        raise RuntimeError("hook")

    def good_hook() -> None:
        got.append(99)

    completions.add_hook(bad_hook)
    completions.add_hook(good_hook)
    try:
        completions.defer(loop, lambda ret: 1 / 0, 0)
        completions.defer(loop, got.append, 7)
        await asyncio.sleep(0)
        assert got == [7, 99]
        assert len(errors) == 1
        assert not completions.in_batch()
    finally:
        completions.remove_hook(bad_hook)
        completions.remove_hook(good_hook)


async def test_completions_deferred_inside_a_batch_run_before_its_hooks() -> None:
    """A null node's completion deferred while a batch is open (the kick handler's) is
    delivered when the batch ends, before the end-of-batch hooks, not in a later loop
    iteration and not inside the deferring call."""
    loop = asyncio.get_running_loop()
    order: list[str] = []
    completions.add_hook(lambda: order.append("hook"))
    hook = completions._hooks[-1]
    try:
        completions.begin()
        completions.defer(loop, lambda ret: order.append(f"done {ret}"), 3)
        assert order == []  # never inside the submit call
        completions.end()
        assert order == ["done 3", "hook"]
    finally:
        completions.remove_hook(hook)
