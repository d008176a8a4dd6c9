"""The restart delay of `spendgate dev`: 0.5 s doubling to 10 s, back to 0.5 s after a stable run."""

from spendgate.dev import Backoff


def test_crashes_in_a_row_wait_twice_as_long_each_time_up_to_the_cap() -> None:
    backoff = Backoff(first_s=0.5, max_s=10.0, stable_after_s=30.0)
    delays = [backoff.after_exit(uptime_s=1.0) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_a_child_that_stayed_up_long_enough_is_restarted_fast_again() -> None:
    backoff = Backoff(first_s=0.5, max_s=10.0, stable_after_s=30.0)
    for _ in range(5):
        backoff.after_exit(uptime_s=0.0)
    assert backoff.after_exit(uptime_s=29.9) == 10.0
    assert backoff.after_exit(uptime_s=30.0) == 0.5
    assert backoff.after_exit(uptime_s=2.0) == 1.0
