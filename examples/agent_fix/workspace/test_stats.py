"""The agent-fix example's acceptance tests: the gate, not the agent, decides when median is fixed."""

import pytest

from stats import median


def test_odd_count_unsorted() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_even_count_is_the_mean_of_the_middle_two() -> None:
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_single_value() -> None:
    assert median([7.0]) == 7.0


def test_empty_is_refused() -> None:
    with pytest.raises(ValueError):
        median([])
