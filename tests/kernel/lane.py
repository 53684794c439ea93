"""Placeholder until the kernel lane lands (issue 3)."""
raise SystemExit("kernel lane: not built yet")
