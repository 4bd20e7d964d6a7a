"""Where a request keeps its inline images and tool-call ids (the contract every API implements)."""

from __future__ import annotations

from typing import NamedTuple


class ImageSlot(NamedTuple):
    """One inline image inside a request body: holder[key] is its text."""
    holder: dict            # the dict holding the text (mutable: near/digest code replaces holder[key])
    key: str                # "url" / "image_url" (a data: URL) or "data" (bare base64)
    encoding: str           # "data_url" (data:image/png;base64,...) or "base64" (bare)
    media_type: str | None  # for "base64" slots, e.g. Anthropic's source.media_type; None for data URLs


class IdSlot(NamedTuple):
    """One tool-call id inside a request body: holder[key] is the id string."""
    holder: dict
    key: str
