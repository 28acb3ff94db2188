"""Content-defined chunk plans (FastCDC, via pyfastcdc).

Cut points depend on the bytes around them, not on their offset, so a new
version that changes only the tail of a model file keeps every earlier chunk,
and a node that holds the old version fetches only the chunks that changed.
The plan depends on the parameters too: every version of a model must be cut
with the same `ChunkParams` for chunks to be shared (the default is fixed).

Pure: bytes in, chunk references out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyfastcdc

from mesh.artifacts.manifest import MAX_CHUNK_BYTES, ArtifactError, ChunkRef

KIB = 1024


class ChunkingError(ArtifactError):
    """Chunking parameters are out of range."""


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC cut parameters.

    `avg_size_bytes` is FastCDC's target (a power of two). FastCDC skips `min_size_bytes`
    before looking for a cut, so the measured mean is a little above the target: with the
    defaults, ~300 KiB on a 5.5 MB float16 model and on random bytes.
    """

    avg_size_bytes: int = 256 * KIB
    min_size_bytes: int | None = None  # default avg / 4, as in the FastCDC paper
    max_size_bytes: int | None = None  # default avg * 4

    def __post_init__(self) -> None:
        avg = self.avg_size_bytes
        if not isinstance(avg, int) or isinstance(avg, bool) or avg < 256 or avg > 4096 * KIB \
                or avg & (avg - 1):
            raise ChunkingError(f"avg_size_bytes must be a power of two from 256 to 4 MiB, got {avg!r}")
        if self.min_size_bytes is None:
            object.__setattr__(self, "min_size_bytes", avg // 4)
        if self.max_size_bytes is None:
            object.__setattr__(self, "max_size_bytes", avg * 4)
        lo, hi = self.min_size_bytes, self.max_size_bytes
        if not isinstance(lo, int) or isinstance(lo, bool) or not 64 <= lo <= 1024 * KIB:
            raise ChunkingError(f"min_size_bytes must be 64 B .. 1 MiB, got {lo!r}")
        if not isinstance(hi, int) or isinstance(hi, bool) or not 1024 <= hi <= MAX_CHUNK_BYTES:
            raise ChunkingError(f"max_size_bytes must be 1 KiB .. {MAX_CHUNK_BYTES // (1024 * KIB)} MiB, "
                                f"got {hi!r}")
        if not lo <= avg <= hi:
            raise ChunkingError(
                f"chunk sizes must satisfy min <= avg <= max, got {lo} / {avg} / {hi} bytes"
            )

    def chunker(self) -> pyfastcdc.FastCDC:
        # seed=0 is FastCDC's published gear table: the same plan on every node and every version.
        return pyfastcdc.FastCDC(self.avg_size_bytes, min_size=self.min_size_bytes,
                                 max_size=self.max_size_bytes, seed=0)


DEFAULT_PARAMS = ChunkParams()


def plan_chunks(data: bytes, params: ChunkParams = DEFAULT_PARAMS) -> list[ChunkRef]:
    """Cut `data` into content-defined chunks and hash each one."""
    view = memoryview(data)
    return [
        ChunkRef(index=i, offset=c.offset, size_bytes=c.length,
                 sha256=hashlib.sha256(view[c.offset:c.offset + c.length]).hexdigest())
        for i, c in enumerate(params.chunker().cut_buf(view))
    ]
