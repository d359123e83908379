"""The built-in `review` loop (loop.py) and its per-file analyzer `review-file` (analyze.py)."""
