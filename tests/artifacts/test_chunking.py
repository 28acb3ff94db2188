"""Content-defined chunk plans: deterministic, contiguous, and stable under local edits."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfastcdc.cy import FastCDC as CythonFastCDC
from pyfastcdc.py import FastCDC as PythonFastCDC

from mesh.artifacts.chunking import ChunkingError, ChunkParams, plan_chunks
from tests.models import mediapipe_model

KIB = 1024
SMALL = ChunkParams(avg_size_bytes=4 * KIB)  # min 1 KiB, max 16 KiB


def shared(a, b) -> int:
    return len({c.sha256 for c in a} & {c.sha256 for c in b})


def test_defaults_target_256_kib():
    params = ChunkParams()
    assert (params.avg_size_bytes, params.min_size_bytes, params.max_size_bytes) == (256 * KIB, 64 * KIB,
                                                                                    1024 * KIB)


@pytest.mark.parametrize("kwargs,match", [
    ({"avg_size_bytes": 300 * KIB}, "power of two"),
    ({"avg_size_bytes": 128}, "power of two"),
    ({"avg_size_bytes": 8 * 1024 * KIB}, "power of two"),
    ({"avg_size_bytes": 4 * KIB, "min_size_bytes": 8 * KIB}, "min <= avg <= max"),
    ({"avg_size_bytes": 4 * KIB, "max_size_bytes": 2 * KIB}, "min <= avg <= max"),
    ({"avg_size_bytes": 4 * KIB, "min_size_bytes": 10}, "min_size_bytes"),
    ({"avg_size_bytes": 4 * KIB, "max_size_bytes": 32 * 1024 * KIB}, "max_size_bytes"),
])
def test_params_are_validated(kwargs, match):
    with pytest.raises(ChunkingError, match=match):
        ChunkParams(**kwargs)


def test_real_model_plan_covers_the_file():
    data = mediapipe_model("hand_landmark_full").read_bytes()  # 5.5 MB, float16 weights
    params = ChunkParams()
    plan = plan_chunks(data, params)
    assert 10 <= len(plan) <= 40, len(plan)
    assert plan[0].offset == 0 and plan[-1].end == len(data)
    for before, after in itertools.pairwise(plan):
        assert after.offset == before.end and after.index == before.index + 1
    for ref in plan[:-1]:
        assert params.min_size_bytes <= ref.size_bytes <= params.max_size_bytes
    for ref in plan:
        assert ref.sha256 == hashlib.sha256(data[ref.offset:ref.end]).hexdigest()
    assert plan == plan_chunks(data, params)  # deterministic


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 64 * KIB))
def test_cython_and_pure_python_fastcdc_cut_alike(seed, size):
    # The gear table is fixed (seed=0): every node, whichever pyfastcdc build it has, cuts the same.
    data = random.Random(seed).randbytes(size)
    bounds = {"min_size": KIB, "max_size": 16 * KIB}
    cuts = [(c.offset, c.length) for c in CythonFastCDC(4 * KIB, **bounds).cut_buf(data)]
    assert cuts == [(c.offset, c.length) for c in PythonFastCDC(4 * KIB, **bounds).cut_buf(data)]
    assert [(r.offset, r.size_bytes) for r in plan_chunks(data, SMALL)] == cuts


def test_empty_input_has_no_chunks():
    assert plan_chunks(b"", SMALL) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_edit_near_the_end_changes_only_the_last_chunks(seed):
    rng = random.Random(seed)
    data = rng.randbytes(2 * 1024 * KIB)
    at = len(data) - 3 * KIB
    edited = data[:at] + rng.randbytes(100) + data[at:]
    old, new = plan_chunks(data, SMALL), plan_chunks(edited, SMALL)
    unchanged = 0
    while unchanged < min(len(old), len(new)) and old[unchanged] == new[unchanged]:
        unchanged += 1
    assert unchanged >= len(old) - 3, f"seed {seed}: only {unchanged} of {len(old)} leading chunks kept"


@pytest.mark.parametrize("seed", [1, 2])
def test_insert_at_the_start_keeps_most_chunks(seed):
    # Fixed-size blocks would all shift; content-defined cuts resynchronise after the edit.
    rng = random.Random(seed)
    data = rng.randbytes(1024 * KIB)
    old, new = plan_chunks(data, SMALL), plan_chunks(rng.randbytes(37) + data, SMALL)
    assert shared(old, new) >= len(old) - 3, f"seed {seed}"
