"""Swarm download of model chunks: piece and peer choice, bandwidth caps, resume.

The pure cores are `scheduler` (which chunk from whom) and `ratelimit` (token
buckets and upload slots); the gRPC node and the simulator (`mesh.sim.swarm`)
are their adapters.
"""

from mesh.transfer.ratelimit import RateLimitError, TokenBucket, UploadSlots
from mesh.transfer.scheduler import (
    ChunkDone,
    FailureReason,
    PeerBanned,
    PeerBenched,
    PeerView,
    Request,
    RequestCancelled,
    SchedulerConfig,
    SchedulerError,
    SwarmScheduler,
    TransferComplete,
    TransferStats,
)

__all__ = [
    "ChunkDone",
    "FailureReason",
    "PeerBanned",
    "PeerBenched",
    "PeerView",
    "RateLimitError",
    "Request",
    "RequestCancelled",
    "SchedulerConfig",
    "SchedulerError",
    "SwarmScheduler",
    "TokenBucket",
    "TransferComplete",
    "TransferStats",
    "UploadSlots",
]
