"""Small statistics helpers (the agent-fix example's code under repair)."""


def median(values: list[float]) -> float:
    """The middle value of `values` (the mean of the two middle ones for an even count)."""
    if not values:
        raise ValueError("median of an empty list")
    return values[len(values) // 2]
