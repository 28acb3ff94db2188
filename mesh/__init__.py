"""fleetmesh: a peer-to-peer coordination mesh for fleets of edge-AI devices."""

__version__ = "0.1.0"
