"""The one back-off policy every shell retries with, and its asyncio driver."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.retry import Backoff, retry


@given(st.floats(0.001, 1.0), st.floats(1.0, 30.0), st.floats(0.0, 0.9), st.integers(0, 2**32))
def test_delays_grow_to_the_cap_and_stay_within_jitter(first_s, max_s, jitter, seed) -> None:
    backoff = Backoff(first_s=first_s, max_s=max(max_s, first_s), jitter=jitter, rng=random.Random(seed))
    nominal = first_s
    for _ in range(40):
        delay = backoff.next_delay_s()
        assert nominal * (1 - jitter) - 1e-12 <= delay <= nominal + 1e-12
        nominal = min(backoff.max_s, nominal * 2)
    backoff.reset()
    assert backoff.next_delay_s() <= first_s


@pytest.mark.parametrize("kwargs", [dict(first_s=0), dict(first_s=2, max_s=1), dict(factor=0.5),
                                    dict(jitter=1.0), dict(jitter=-0.1)])
def test_bad_settings_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="back-off"):
        Backoff(**kwargs)


@pytest.mark.asyncio
async def test_retry_retries_listed_errors_and_propagates_others(caplog) -> None:
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("not yet")
        return "done"

    log = logging.getLogger("test.retry")
    with caplog.at_level(logging.WARNING, logger="test.retry"):
        result = await retry(flaky, retry_on=(TimeoutError,), backoff=Backoff(first_s=0.001, max_s=0.002),
                             what="claiming", log=log)
    assert result == "done" and len(calls) == 3
    assert sum("claiming failed (not yet)" in r.getMessage() for r in caplog.records) == 2

    async def broken() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await retry(broken, retry_on=(TimeoutError,), backoff=Backoff(), what="x", log=log)
