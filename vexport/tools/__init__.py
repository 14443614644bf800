"""Stand-alone tools shipped with vexport (test clients, diagnostics)."""
