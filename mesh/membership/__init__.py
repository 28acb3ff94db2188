"""SWIM membership with Lifeguard: who is in the fleet and who is alive.

`core.Membership` is the pure state machine; `messages` is its vocabulary and
`config` its settings; `federation` chooses a site's representatives for the
federation pool; `service` and `wire` carry it over gRPC.
"""
