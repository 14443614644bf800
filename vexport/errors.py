"""QMP error classes.

Every error a user can see is raised as one of these, anywhere in the daemon, and
turned into a wire reply (``{"error": {"class": ..., "desc": ...}}``) or a
command-line message in exactly one place (the QMP session / the CLI).

    QMPError
     +-- GenericError        almost everything
     +-- CommandNotFound     unknown command, capabilities negotiation state
     +-- DeviceNotFound      (QEMU uses it for a few lookups)

Kernel errors travel as ``OSError`` and are translated at the API boundary.
"""

from __future__ import annotations


class QMPError(Exception):
    """An error with a QMP error class and a human readable description."""

    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def to_wire(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class GenericError(QMPError):
    error_class = "GenericError"


class CommandNotFound(QMPError):
    error_class = "CommandNotFound"


class DeviceNotFound(QMPError):
    error_class = "DeviceNotFound"
