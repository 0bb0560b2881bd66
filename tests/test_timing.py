"""Timing helpers shared by the quantisation report, inference and the benchmarks."""

import pytest

from monai_qsa.utils.timing import in_turn


def test_in_turn_measures_every_name_each_round_and_turns_the_order():
    calls = []

    def measure(name: str) -> tuple[str, int]:
        calls.append(name)
        return name, len(calls)

    results = in_turn(measure, ["a", "b", "c"], rounds=4)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    # each name's results in round order, each from its own call
    assert {name: [n for n, _ in values] for name, values in results.items()} == {n: [n] * 4 for n in "abc"}
    assert [index for _, index in results["a"]] == [1, 6, 8, 10]
    # every name runs first once in three rounds
    assert [calls[i] for i in (0, 3, 6)] == ["a", "b", "c"]


def test_in_turn_needs_names_and_a_round():
    with pytest.raises(ValueError, match="got 1 names and 0 rounds"):
        in_turn(lambda name: name, ["a"], rounds=0)
    with pytest.raises(ValueError, match="got 0 names and 2 rounds"):
        in_turn(lambda name: name, [], rounds=2)
