"""Operator-facing admin service, its client and the CLI's formatting."""
