"""Workflows: deterministic orchestration only. I/O happens in activities."""
