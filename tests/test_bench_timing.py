"""``bench.common.interleaved_wall_ms``, the timing every side-by-side benchmark table uses:
rounds taken in turn, each function's round started by one untimed call (the cost of the
switch from the previous function is not charged to the next one)."""

import torch

from bench import common


def test_rounds_in_turn_each_after_one_untimed_call():
    log: list[str] = []
    fns = {key: (lambda key=key: log.append(key)) for key in ("a", "b")}
    samples = common.interleaved_wall_ms(fns, torch.device("cpu"), rounds=3, calls=4)
    assert {key: len(rounds) for key, rounds in samples.items()} == {"a": 3, "b": 3}
    assert all(ms > 0 for rounds in samples.values() for ms in rounds)
    warm_up = ["a"] * 3 + ["b"] * 3
    assert log == warm_up + (["a"] * (1 + 4) + ["b"] * (1 + 4)) * 3


def test_untimed_call_is_not_counted():
    """A function whose first call of each round is slow: that call is not in its time."""
    state = {"calls": 0}

    def slow_first():
        state["calls"] += 1
        if state["calls"] % 6 == 4:  # after 3 warm-up calls, the first call of each round (1 + 5 per round)
            end = common.time.perf_counter() + 0.05
            while common.time.perf_counter() < end:
                pass

    rounds = common.interleaved_wall_ms({0: slow_first}, torch.device("cpu"), rounds=3, calls=5)[0]
    assert max(rounds) < 0.05 * 1e3 / 5 / 2, rounds  # a slow call counted would add 10 ms per call
