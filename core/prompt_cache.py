"""Prompt caching: where loopterm marks the prompt's stable prefix, and what a reply says the cache served.

Providers serve a prompt's longest common prefix with earlier calls from a cache, at a lower
price. OpenAI, DeepSeek, Gemini and most others do it on their own; Claude (on Anthropic,
Bedrock, Vertex AI, Azure AI) caches only up to a marked breakpoint. core/prompt.py puts what a
run never changes in the system message, so one breakpoint at its end covers the stable prefix
(with the tools, which Anthropic caches before the system text). It is asked for through
litellm's `cache_control_injection_points` request parameter: litellm adds the provider's
marker to the request it sends, so the messages loopterm stores and journals stay plain text.

Pricing is litellm's (completion_cost prices cache reads and writes at their own rates); usage
is litellm's normalised form, where `prompt_tokens` counts every input token, cached or not.
"""

from __future__ import annotations

import functools
from typing import Any

# The end of the system message: Anthropic allows four breakpoints; one is enough for one prefix.
BREAKPOINTS: tuple[dict[str, str], ...] = ({"location": "message", "role": "system"},)


@functools.lru_cache(maxsize=64)
def marks_prefix(model: str) -> bool:
    """Whether `model` caches only what is marked, as litellm tells (Claude on Anthropic, Bedrock, Vertex AI,
    Azure AI, with litellm's `supports_prompt_caching`). An offline or unknown model: no."""
    try:
        from litellm.llms.anthropic.common_utils import supports_anthropic_cache_control

        return bool(supports_anthropic_cache_control(model, None))
    except Exception:  # noqa: BLE001 - a model litellm cannot route is simply not marked
        return False


def cache_points(model: str) -> list[dict[str, str]] | None:
    """The request's `cache_control_injection_points` for `model`, or None when it needs none."""
    return [dict(point) for point in BREAKPOINTS] if marks_prefix(model) else None


def cached_tokens(usage: Any) -> int:
    """The input tokens a reply says its provider's cache served (0 when it says nothing).

    litellm puts them in ``usage.prompt_tokens_details.cached_tokens`` for every provider
    (Anthropic's cache_read_input_tokens included); the raw Anthropic field is the fallback.
    Cache writes are not reads: they are priced (higher) in the cost, not counted here.
    """
    details = getattr(usage, "prompt_tokens_details", None)
    value = getattr(details, "cached_tokens", None) if details is not None else None
    if not value:
        value = getattr(usage, "cache_read_input_tokens", None)
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def hit_ratio(tokens_cached: int, tokens_in: int) -> float | None:
    """The share of input tokens the cache served; None when there was no input."""
    return tokens_cached / tokens_in if tokens_in > 0 else None


def hit_text(tokens_cached: int, tokens_in: int) -> str:
    """The cache hit ratio as people read it: "62%", "-" with no input."""
    ratio = hit_ratio(tokens_cached, tokens_in)
    return "-" if ratio is None else f"{ratio:.0%}"
