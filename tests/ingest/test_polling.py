"""The politeness rules: back-off, Retry-After, max-age, 410 Gone."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.ingest.polling import MAX_DELAY, backoff, next_poll, rescheduled

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
INTERVAL = timedelta(minutes=30)


def test_success_polls_again_after_the_interval() -> None:
    decision = next_poll(now=NOW, interval=INTERVAL, ok=True, status=200, failures=0)
    assert decision.state == "ok"
    assert decision.next_attempt == NOW + INTERVAL


def test_max_age_is_a_lower_bound_on_the_next_poll_within_a_day() -> None:
    longer = next_poll(now=NOW, interval=INTERVAL, ok=True, status=200, failures=0, max_age=7200)
    shorter = next_poll(now=NOW, interval=INTERVAL, ok=True, status=200, failures=0, max_age=60)
    huge = next_poll(now=NOW, interval=INTERVAL, ok=True, status=304, failures=0, max_age=10**9)
    assert longer.next_attempt == NOW + timedelta(hours=2)
    assert shorter.next_attempt == NOW + INTERVAL
    assert huge.next_attempt == NOW + MAX_DELAY


def test_gone_stops_polling() -> None:
    decision = next_poll(now=NOW, interval=INTERVAL, ok=False, status=410, failures=1)
    assert decision.state == "gone"
    assert decision.next_attempt is None


def test_failures_back_off_growing_and_capped_at_a_day() -> None:
    rng = random.Random(7)
    waits = [
        next_poll(
            now=NOW, interval=INTERVAL, ok=False, status=500, failures=n, rng=rng
        ).next_attempt
        - NOW
        for n in range(1, 12)
    ]
    assert all(w is not None for w in waits)
    # Doubling dominates the ±20 % jitter: below the cap every second step is longer
    # (30 min, 1 h, 2 h, 4 h, 8 h for the first five failures).
    assert all(waits[i + 2] > waits[i] for i in range(3))
    # Far past the cap the wait stays within the jitter below one day, never above.
    assert all(MAX_DELAY * 0.8 <= w <= MAX_DELAY for w in waits[7:])


def test_retry_after_is_honoured_on_429_and_503_only() -> None:
    for status in (429, 503):
        d = next_poll(
            now=NOW, interval=INTERVAL, ok=False, status=status, failures=1, retry_after=3 * 3600
        )
        assert d.next_attempt == NOW + timedelta(hours=3)
    other = next_poll(
        now=NOW,
        interval=INTERVAL,
        ok=False,
        status=500,
        failures=1,
        retry_after=3 * 3600,
        rng=random.Random(1),
    )
    assert other.next_attempt is not None and other.next_attempt - NOW < timedelta(hours=1)


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=1, max_value=1440))
def test_backoff_is_never_shorter_than_the_interval_nor_longer_than_a_day(
    failures: int, minutes: int
) -> None:
    interval = timedelta(minutes=minutes)
    wait = backoff(interval, failures, random.Random(failures))
    assert min(interval, MAX_DELAY) <= wait <= MAX_DELAY


# -- a shorter configured interval ---------------------------------------------------------

MINUTE = timedelta(minutes=1)


def _moved(
    waited: timedelta, *, state: str = "ok", status: int | None = 200, failures: int = 0
) -> datetime | None:
    return rescheduled(
        next_attempt=NOW + waited,
        last_attempt=NOW,
        state=state,
        last_status=status,
        failures=failures,
        old_interval=INTERVAL,
        new_interval=MINUTE,
    )


def test_a_shorter_interval_brings_a_waiting_feed_forward() -> None:
    assert _moved(INTERVAL) == NOW + MINUTE


def test_a_wait_the_server_asked_for_is_kept_under_a_shorter_interval() -> None:
    # Cache-Control: max-age=7200 made the wait two hours; that was the server's wish.
    assert _moved(timedelta(hours=2)) == NOW + timedelta(hours=2)
    # A failing feed told 429 or 503 may have been given a Retry-After: kept.
    assert _moved(timedelta(minutes=33), state="failing", status=503, failures=1) == (
        NOW + timedelta(minutes=33)
    )
    # A Retry-After longer than any back-off of ours: kept, whatever the status.
    assert _moved(timedelta(hours=5), state="failing", status=None, failures=1) == (
        NOW + timedelta(hours=5)
    )


def test_a_failing_feed_keeps_backing_off_from_the_new_interval() -> None:
    # Third failure under 30 minutes: about two hours; under one minute: about four.
    moved = _moved(timedelta(minutes=120), state="failing", status=None, failures=3)
    assert moved == NOW + timedelta(minutes=4)


def test_a_longer_interval_or_a_gone_feed_changes_nothing() -> None:
    longer = rescheduled(
        next_attempt=NOW + INTERVAL,
        last_attempt=NOW,
        state="ok",
        last_status=200,
        failures=0,
        old_interval=INTERVAL,
        new_interval=timedelta(hours=1),
    )
    assert longer == NOW + INTERVAL
    assert _moved(INTERVAL, state="gone", status=410) == NOW + INTERVAL


@given(
    st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=2)),
    st.sampled_from(["ok", "failing", "new", "gone"]),
    st.sampled_from([None, 200, 304, 429, 500, 503]),
    st.integers(min_value=0, max_value=30),
)
def test_rescheduling_never_makes_a_feed_wait_longer(
    waited: timedelta, state: str, status: int | None, failures: int
) -> None:
    moved = _moved(waited, state=state, status=status, failures=failures)
    assert (moved is not None and NOW < moved <= NOW + waited) or waited == timedelta(0)
