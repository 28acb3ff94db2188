"""Token bucket and upload slots: the arithmetic, the debt, the validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.transfer.ratelimit import RateLimitError, TokenBucket, UploadSlots

KIB = 1024


def test_bucket_starts_full_and_a_reservation_within_burst_costs_no_wait() -> None:
    bucket = TokenBucket(1000.0, 500, now=0.0)
    assert bucket.available(0.0) == 500
    assert bucket.reserve(400, 0.0) == 0.0
    assert bucket.available(0.0) == pytest.approx(100)


def test_a_chunk_larger_than_the_burst_goes_into_debt_and_waits_for_it() -> None:
    bucket = TokenBucket(1_000_000.0, 64 * KIB, now=10.0)
    wait_s = bucket.reserve(256 * KIB, 10.0)
    assert wait_s == pytest.approx((256 - 64) * KIB / 1_000_000)
    assert bucket.available(10.0) < 0
    # A second chunk queues behind the first.
    assert bucket.reserve(256 * KIB, 10.0) == pytest.approx((512 - 64) * KIB / 1_000_000)
    assert bucket.debt_s(10.0 + wait_s) == pytest.approx(256 * KIB / 1_000_000)


def test_refill_stops_at_the_burst_and_time_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(100.0, 50, now=0.0)
    bucket.reserve(50, 0.0)
    assert bucket.available(100.0) == 50
    assert bucket.available(1.0) == 50  # earlier than the last call: no refill, no error
    bucket.reserve(50, 100.0)
    assert bucket.available(100.25) == pytest.approx(25)


@pytest.mark.parametrize("rate", [0, -1, math.nan, math.inf, True, "10"])
def test_bucket_rejects_unusable_rates(rate: object) -> None:
    with pytest.raises(RateLimitError, match="rate_bytes_per_s"):
        TokenBucket(rate, 100, now=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("burst", [0, -5, math.inf])
def test_bucket_rejects_unusable_bursts(burst: object) -> None:
    with pytest.raises(RateLimitError, match="burst_bytes"):
        TokenBucket(100.0, burst, now=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_bytes", [-1, 1.5, True])
def test_reserve_rejects_what_is_not_a_byte_count(n_bytes: object) -> None:
    with pytest.raises(RateLimitError, match="whole number of bytes"):
        TokenBucket(100.0, 100, now=0.0).reserve(n_bytes, 0.0)  # type: ignore[arg-type]


@given(rate=st.floats(1.0, 1e7), burst=st.integers(1, 1 << 20),
       steps=st.lists(st.tuples(st.floats(0.0, 5.0), st.integers(0, 1 << 20)), min_size=1, max_size=30))
def test_bytes_paid_for_never_exceed_burst_plus_rate_times_elapsed(rate: float, burst: int,
                                                                   steps: list[tuple[float, int]]) -> None:
    """Whatever the pattern of reservations, by the time each one's wait is over the
    bucket has let through at most burst + rate x elapsed bytes, and each wait is
    exactly the time to pay off the debt."""
    bucket = TokenBucket(rate, burst, now=0.0)
    now, reserved = 0.0, 0
    for dt, n_bytes in steps:
        now += dt
        wait_s = bucket.reserve(n_bytes, now)
        reserved += n_bytes
        assert wait_s >= 0
        paid_at = now + wait_s
        assert reserved <= burst + rate * paid_at + 1e-6 * max(1, reserved)
        assert wait_s == pytest.approx(max(0.0, -bucket.available(now)) / rate)


def test_upload_slots_refuse_beyond_the_cap_and_free_on_release() -> None:
    slots = UploadSlots(2)
    assert slots.try_acquire() and slots.try_acquire()
    assert not slots.try_acquire()
    assert (slots.in_use, slots.free) == (2, 0)
    slots.release()
    assert slots.try_acquire()


def test_upload_slots_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RateLimitError, match="without a matching try_acquire"):
        UploadSlots(1).release()


@pytest.mark.parametrize("cap", [0, -1, 1.5, True])
def test_upload_slots_reject_bad_caps(cap: object) -> None:
    with pytest.raises(RateLimitError, match="max_concurrent"):
        UploadSlots(cap)  # type: ignore[arg-type]
