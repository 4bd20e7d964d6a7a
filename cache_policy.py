"""Cache keys and the pure decision whether a request may be served from or written to the cache.

Nothing here does I/O or knows Flask: ``decide`` takes the parsed body and a few request facts
and returns a ``Decision`` whose ``reason`` becomes the ``...-Bypass-Reason`` header.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

from config import Settings
from secret_scan import CREDENTIAL_PATTERN, contains_secret  # noqa: F401 (re-exported)

# Body fields that steer the proxy or the transport, never the answer.
ALWAYS_IGNORED_KEYS = frozenset({"stream", "stream_options", "cache", "cache_control", "metadata"})

_TRUE_WORDS = {"1", "true", "yes", "on", "y", "t"}


def canonical_json(value: Any) -> str:
    """Sorted keys at every level, no whitespace, non-ASCII as itself: the original's key text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_payload(mode: str, body: Mapping[str, Any], ignore_keys: frozenset[str]) -> dict:
    payload = {name: value for name, value in body.items() if name not in ignore_keys}
    payload["mode"] = mode
    return payload


def hash_canonical(canonical: str, partition: str | None = None) -> str:
    """The cache key: the original's sha256 of the canonical text, or, for a partitioned cache,
    the sha256 of the partition and the text.

    The partitioned form starts with "partition " where every canonical text starts with "{",
    so no request body can produce another partition's key, nor an unpartitioned one.
    """
    text = canonical if partition is None else f"partition {partition}\n{canonical}"
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); they must hash, not crash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def switch_value(value: Any) -> bool:
    """A body switch read like an environment boolean (anything unrecognised is off)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE_WORDS


def body_cache_switch(body: Mapping[str, Any]) -> bool | None:
    """The first per-request switch present, in the original's order; None when there is none."""
    if "cache" in body and body["cache"] is not None:
        return switch_value(body["cache"])
    control = body.get("cache_control")
    if isinstance(control, dict) and control.get("enabled") is not None:
        return switch_value(control["enabled"])
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        for name in ("cache", "cache_enabled"):
            if metadata.get(name) is not None:
                return switch_value(metadata[name])
    return None


def strip_proxy_controls(body: dict[str, Any]) -> dict[str, Any]:
    """The body to forward: proxy-only switches removed (OpenAI rejects unknown parameters)."""
    forwarded = dict(body)
    forwarded.pop("cache", None)
    control = forwarded.get("cache_control")
    if isinstance(control, dict) and set(control) <= {"enabled"}:
        del forwarded["cache_control"]
    metadata = forwarded.get("metadata")
    if isinstance(metadata, dict) and ("cache" in metadata or "cache_enabled" in metadata):
        metadata = {k: v for k, v in metadata.items() if k not in ("cache", "cache_enabled")}
        if metadata:
            forwarded["metadata"] = metadata
        else:
            del forwarded["metadata"]
    return forwarded


def model_is_cacheable(model: str, allowlist: tuple[str, ...], denylist: tuple[str, ...]) -> bool:
    if any(fnmatch.fnmatchcase(model, pattern) for pattern in denylist):
        return False
    if allowlist:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in allowlist)
    return True


def contains_credentials(text: str) -> bool:
    """The original's labelled check plus bare tokens (keys, JWTs, PEM blocks): see secret_scan."""
    return contains_secret(text)


@dataclass(frozen=True)
class Decision:
    """What the cache may do with one request, and why not when it may not."""

    key: str
    canonical: str
    read: bool
    write: bool
    reason: str | None = None

    @property
    def bypass(self) -> bool:
        return not (self.read or self.write)


def decide(
    settings: Settings,
    mode: str,
    body: Mapping[str, Any],
    *,
    bypass_header: bool = False,
    partition: str | None = None,
) -> Decision:
    """Derive the key and decide; the first reason that applies wins, as in the original.

    ``partition`` (a keyed hash of the client's API key, see key_partition) is mixed into the
    key when given, so clients with different keys never share entries; without it the key is
    byte-identical to the original server's.
    """
    ignore = ALWAYS_IGNORED_KEYS | frozenset(settings.cache_ignore_keys)
    canonical = canonical_json(canonical_payload(mode, body, ignore))
    key = hash_canonical(canonical, partition)

    def bypass(reason: str) -> Decision:
        return Decision(key, canonical, read=False, write=False, reason=reason)

    if bypass_header:
        return bypass("X-Cache-Bypass requested")
    switch = body_cache_switch(body)
    if not (settings.cache_enabled if switch is None else switch):
        return bypass("cache disabled for request")
    model = body.get("model")
    if not model_is_cacheable(str(model), settings.cache_model_allowlist, settings.cache_model_denylist):
        return bypass(f"model is not cacheable: {model}")
    if len(canonical) > settings.cache_max_input_chars:
        return bypass("request is too large for cache")
    if contains_credentials(canonical):
        return bypass("request appears to contain credentials or secrets")
    return Decision(key, canonical, read=True, write=True)
