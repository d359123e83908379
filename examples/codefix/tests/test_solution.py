"""The codefix task's acceptance tests: the gate, not the model, decides when slugify is done.

Copied into each run's workspace next to the model's solution.py; the model
must never edit this file (the `solution_only` invariant).
"""

from solution import slugify


def test_lowercases_and_joins_words() -> None:
    assert slugify("Hello World") == "hello-world"


def test_runs_of_separators_collapse_to_one_dash() -> None:
    assert slugify("Many   spaces -- and___punctuation!!") == "many-spaces-and-punctuation"


def test_leading_and_trailing_dashes_are_stripped() -> None:
    assert slugify("  --Already-Slugged--  ") == "already-slugged"


def test_digits_are_kept() -> None:
    assert slugify("Python 3.11 Release") == "python-3-11-release"


def test_accents_are_folded_to_ascii() -> None:
    assert slugify("Crème Brûlée à la Carte") == "creme-brulee-a-la-carte"


def test_nothing_alphanumeric_gives_empty_string() -> None:
    assert slugify("") == ""
    assert slugify("!?  ...") == ""
