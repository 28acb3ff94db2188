"""Discrete-event simulators that drive the same pure cores as the node, under a seed."""
