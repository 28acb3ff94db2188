"""Raft groups of a site and their replicated state machines (routing, allocations, pending decisions)."""
