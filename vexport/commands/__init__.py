"""QMP command handlers; importing this package registers them all."""

from __future__ import annotations

import importlib


def load_all() -> None:
    """Import every command module so that its commands are in the registry."""
    for name in ("misc", "block", "export"):
        importlib.import_module(f"vexport.commands.{name}")
