"""The demo task's acceptance tests: the gate, not the model, decides when to_roman is done.

Copied into each run's workspace next to the model's solution.py; the model
must never edit this file (the demo's write_file refuses, and the
`solution_only` invariant escalates the attempt to a person).
"""

import pytest

from solution import to_roman


def test_single_symbols() -> None:
    assert [to_roman(n) for n in (1, 5, 10, 50, 100, 500, 1000)] == ["I", "V", "X", "L", "C", "D", "M"]


def test_additive_forms() -> None:
    assert [to_roman(n) for n in (2, 3, 8, 27, 1666)] == ["II", "III", "VIII", "XXVII", "MDCLXVI"]


def test_subtractive_forms() -> None:
    assert [to_roman(n) for n in (4, 9, 40, 90, 400, 900)] == ["IV", "IX", "XL", "XC", "CD", "CM"]


def test_mixed_numbers() -> None:
    assert [to_roman(n) for n in (14, 1994, 2024, 3999)] == ["XIV", "MCMXCIV", "MMXXIV", "MMMCMXCIX"]


@pytest.mark.parametrize("n", [0, -1, 4000])
def test_out_of_range_is_refused(n: int) -> None:
    with pytest.raises(ValueError):
        to_roman(n)
