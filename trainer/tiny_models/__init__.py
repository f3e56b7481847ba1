"""Tiny models built from configs, for the demo and the tests (no hub, no downloads)."""
