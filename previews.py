"""The first words of a stored request, for people browsing the cache (dashboard, entries API).

Anything that looks like a credential is blanked before the text is cut, so a cut never shows
half a key: prompts with secrets are not stored (secret_scan), but entries written by the
original server or imported from elsewhere were held to weaker checks.
"""

from __future__ import annotations

import json
import re
from typing import Any

from secret_scan import CREDENTIAL_PATTERN

PREVIEW_CHARS = 60
# Shapes of secrets that carry no label: provider keys, bearer tokens, long opaque strings.
SECRET_SHAPES = re.compile(
    r"(?:\b(?:sk|pk|rk|ghp|gho|xox[abp])[-_][A-Za-z0-9_\-]{6,}"
    r"|\bbearer\s+\S+"
    r"|[A-Za-z0-9_\-+/=]{24,})",
    re.IGNORECASE,
)

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def prompt_text(request_json: str) -> str:
    """The words a person would recognise a request by: its last user message, or its prompt
    (or input)."""
    try:
        payload = json.loads(request_json)
    except ValueError:
        return ""
    if not isinstance(payload, dict):
        return ""
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
        return _text_of(messages[-1].get("content")) if messages and isinstance(messages[-1], dict) else ""
    prompt = payload.get("prompt", payload.get("input"))  # legacy prompt; Responses or embeddings input
    if isinstance(prompt, list) and any(isinstance(item, dict) for item in prompt):
        for item in reversed(prompt):  # Responses input items: the last user message
            if isinstance(item, dict) and item.get("role") == "user":
                return _text_of(item.get("content"))
        return ""
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt if isinstance(prompt, str) else ""


def prompt_preview(request_json: str, limit: int = PREVIEW_CHARS) -> str:
    """First words of the prompt, credentials blanked before cutting (a cut never reveals half)."""
    text = " ".join(prompt_text(request_json).split())
    text = CREDENTIAL_PATTERN.sub("[redacted]", text)
    text = SECRET_SHAPES.sub("[redacted]", text)
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "\u2026"
    return text
