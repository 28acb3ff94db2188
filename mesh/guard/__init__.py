"""The guard: scope policy, hold/approve/deny of autonomous decisions, approval checks, audit trail.

`core` decides (pure), `approval` verifies operator signatures (pure), `audit`
writes the hash-chained, append-only log (file I/O only).
"""
