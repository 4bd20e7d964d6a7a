"""What an answer cost when the upstream did not say: its usage priced with ``genai-prices``.

OpenRouter sends ``usage.cost``; OpenAI and Anthropic do not. ``genai-prices`` is a maintained
price table shipped inside the package (no network: its auto-update is never started), covering
OpenAI, Anthropic, Google and OpenRouter model names. A model it does not know is never guessed:
``usage_cost`` returns None and the entry is counted as unpriced.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

from genai_prices import Usage, calc_price

log = logging.getLogger("computer_use_cache.pricing")

# Where to look a model name up, in turn: the table's own guess, then OpenRouter's names
# ("anthropic/claude-sonnet-4.5"), then the name after the vendor prefix.
_LOOKUPS = ("guess", "openrouter", "bare")


@functools.lru_cache(maxsize=512)
def _lookup(model: str) -> tuple[str, str | None] | None:
    """(model name, provider id) the table prices ``model`` under, or None: worked out once per
    model name (a failed lookup costs as much as a price)."""
    probe = Usage(input_tokens=1, output_tokens=1)
    for way in _LOOKUPS:
        name, provider = model, None
        if way == "openrouter":
            provider = "openrouter"
        elif way == "bare":
            if "/" not in model:
                continue
            name = model.split("/", 1)[1]
        try:
            calc_price(probe, name, provider_id=provider)
        except (LookupError, ValueError):
            continue
        return name, provider
    return None


def usage_cost(model: Any, figures: dict[str, Any]) -> float | None:
    """The price in USD of one answer's usage (an API's ``usage_figures``), None when the model
    is unknown. Cached input tokens are priced as such when the answer says how many."""
    if not isinstance(model, str) or not model:
        return None
    found = _lookup(model)
    if found is None:
        return None
    name, provider = found
    usage = Usage(input_tokens=figures.get("prompt_tokens") or 0,
                  output_tokens=figures.get("completion_tokens") or 0,
                  cache_read_tokens=figures.get("cache_read_tokens") or 0,
                  cache_write_tokens=figures.get("cache_write_tokens") or 0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(calc_price(usage, name, provider_id=provider).total_price)
    except (LookupError, ValueError, ArithmeticError) as exc:
        log.info("no price for %s: %s", model[:100], exc)
        return None
