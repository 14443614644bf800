"""Top-level pytest configuration.

The real-kernel guest tier lives in tests/guest/plugin.py (see docs/guest.md); tests/ is on
sys.path (pytest's default "prepend" import mode), so the plugin is importable as guest.plugin.
"""

pytest_plugins = ["guest.plugin"]
