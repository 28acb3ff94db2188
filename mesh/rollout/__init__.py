"""Canary rollouts: signed plans, wave cohorts, health gates, the per-site state machine. Pure cores.

`plan` holds the signed documents (publisher plans, operator commands) and the
skew rule, `cohort` who is in which wave, `health` the counters a node gossips
and the gate that judges a wave by them, `state` the per-site state machine
(`RolloutLedger` for the site's Raft group) and `desired_version` for devices.
"""
