"""Argument types of the command line: a bad value is argparse's one line, saying what was expected.

Standard library only: `loopterm --help` must stay fast.
"""

from __future__ import annotations

import argparse


def usd(text: str) -> float:
    """A finite number of US dollars, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of US dollars, got {text!r}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


MAX_INT = 2**63 - 1  # the largest integer SQLite stores (iteration numbers, caps)


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {_shown(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {_shown(text)}")
    if value > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT:,}, got {_shown(text)}")
    return value


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text):,} characters)"


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def days(text: str) -> int:
    """A number of days back, today included (at most a century)."""
    value = positive_int(text)
    if value > 36_600:
        raise argparse.ArgumentTypeError("at most 36600 days")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, e.g. 0.95, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A number of seconds, 0 to a day (how long something may take)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 86_400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, got {text!r}")
    return value
