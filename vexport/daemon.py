"""The daemon object: owns the block graph, the exports, iothreads and monitors.

The command line (``cli.py``) and the QMP commands (``commands/*``) both act on the
daemon through the same methods, so a ``--blockdev`` behaves exactly like
``blockdev-add``.  Everything here runs in the one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from vexport.blockdev.graph import BlockGraph
from vexport.errors import GenericError

log = logging.getLogger("vexport")

EventListener = Callable[[dict[str, Any]], None]


class Daemon:
    def __init__(self) -> None:
        self.graph = BlockGraph()
        # Insertion ordered; QMP lists them newest first.
        self.exports: dict[str, Any] = {}
        self.iothreads: dict[str, Any] = {}
        self.chardevs: dict[str, Any] = {}
        self.monitors: list[Any] = []
        self.nbd_server: Any = None
        self._event_listeners: list[EventListener] = []
        self._quit: asyncio.Event | None = None
        from vexport.commands import load_all

        load_all()  # the QMP commands, whichever way the daemon is driven

    # -- events -----------------------------------------------------------------
    def add_event_listener(self, listener: EventListener) -> None:
        self._event_listeners.append(listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        if listener in self._event_listeners:
            self._event_listeners.remove(listener)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        seconds = int(now)
        event: dict[str, Any] = {
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
            "event": name,
        }
        if data is not None:
            event["data"] = data
        for listener in list(self._event_listeners):
            try:
                listener(event)
            except Exception:  # a broken client must not stop the others
                log.exception("event listener failed")

    # -- lifetime ---------------------------------------------------------------
    def request_quit(self) -> None:
        if self._quit is None:
            self._quit = asyncio.Event()
        self._quit.set()

    async def wait_quit(self) -> None:
        if self._quit is None:
            self._quit = asyncio.Event()
        await self._quit.wait()

    # -- objects used by both the command line and QMP -----------------------------
    async def add_blockdev(self, options: dict[str, Any]) -> None:
        """``--blockdev`` / ``blockdev-add`` with validated options."""
        self.graph.add(options)

    async def add_export(self, options: dict[str, Any]) -> None:
        """``--export`` / ``block-export-add`` with validated options."""
        from vexport.exports import add_export

        await add_export(self, options)

    async def delete_export(self, export_id: str, mode: str = "safe") -> None:
        from vexport.exports import delete_export

        await delete_export(self, export_id, mode)

    def require_iothread(self, name: str) -> Any:
        try:
            return self.iothreads[name]
        except KeyError:
            raise GenericError(f'iothread "{name}" not found') from None

    async def add_object(self, options: dict[str, Any]) -> None:
        """``--object`` / ``object-add`` (iothread) with validated options."""
        from vexport.objects import add_object

        add_object(self, options)

    async def delete_object(self, object_id: str) -> None:
        from vexport.objects import delete_object

        delete_object(self, object_id)

    async def add_chardev(self, options: dict[str, Any]) -> None:
        """``--chardev socket,...``: parsed QemuOpts-style options (see qmp/server.py)."""
        from vexport.qmp.server import add_chardev

        await add_chardev(self, options)

    async def add_monitor(self, options: dict[str, Any]) -> None:
        """``--monitor [chardev=]ID[,mode=control][,pretty=on]``."""
        from vexport.qmp.server import add_monitor

        await add_monitor(self, options)

    async def close(self) -> None:
        """Stop monitors, delete exports (emitting their events), close nodes."""
        from vexport.exports import delete_all_exports
        from vexport.qmp.server import close_monitors

        await delete_all_exports(self)
        await close_monitors(self)
        self.graph.close_all()
        from vexport.io import close_engines

        close_engines()
