"""SWIM membership: who is in the fleet and who is alive.

`core.Membership` is the pure state machine; `messages` is its vocabulary;
`service` and `wire` carry it over gRPC.
"""
