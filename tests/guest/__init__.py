"""Real-kernel guest tier: runner, pytest plugin, helpers, guest tests (docs/guest.md)."""
