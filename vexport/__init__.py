"""vexport: a qemu-storage-daemon compatible storage export daemon."""

__version__ = "0.1.0"

# The qemu-storage-daemon release whose command line and QMP interface vexport
# implements.  QMP clients print it from the greeting and query-version.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
PACKAGE = f"vexport {__version__}"
