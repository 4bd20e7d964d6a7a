"""Cache keys and the pure decision whether a request may be served from or written to the cache.

Nothing here does I/O or knows Flask: ``decide`` takes the parsed body and a few request facts
and returns a ``Decision`` whose ``reason`` becomes the ``...-Bypass-Reason`` header.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from config import MATCH_MODES, Settings
from errors import InvalidRequest
from images import PLAIN_JSON_ASCII, ImageSlot, image_discount, image_texts
from secret_scan import CREDENTIAL_PATTERN, base64_payload_start, contains_secret  # noqa: F401 (re-exported)
from secret_scan import without_bare_base64

# Body fields that steer the proxy or the transport, never the answer.
ALWAYS_IGNORED_KEYS = frozenset({"stream", "stream_options", "cache", "cache_control", "metadata"})

_TRUE_WORDS = {"1", "true", "yes", "on", "y", "t"}


_LONG_STRING = 256




def _string_encoder(clean_strings: list[str] | None) -> Callable[[str], str]:
    """What json.dumps(ensure_ascii=False) writes for a string, with a fast path for long ones.

    json's own escaper walks a string one character at a time; a base64 screenshot needs no
    escaping at all (printable, no quote, no backslash), so it is copied between quotes instead.
    Data: URLs whose payload is all base64 are appended to ``clean_strings`` (when given): the
    pass that proves them plain is the one the credential scan would otherwise repeat.
    """
    escape = json.encoder.encode_basestring

    def json_string(text: str) -> str:
        # ASCII is an O(1) flag on str; plain when deleting the safe bytes leaves nothing.
        if len(text) >= _LONG_STRING and text.isascii():
            encoded = text.encode("ascii")
            payload = base64_payload_start(encoded)
            if payload >= 0:  # base64 bytes are plain: only the head before them needs a look
                if not encoded[:payload].translate(None, PLAIN_JSON_ASCII):
                    if clean_strings is not None:
                        clean_strings.append(text)
                    return f'"{text}"'
            elif not encoded.translate(None, PLAIN_JSON_ASCII):
                return f'"{text}"'
        return escape(text)

    return json_string


def canonical_json(value: Any, clean_strings: list[str] | None = None) -> str:
    """Sorted keys at every level, no whitespace, non-ASCII as itself: the original's key text.

    The same text as ``json.dumps(value, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` (a test holds them equal), about five times faster on agent requests
    that carry screenshots. ``clean_strings``: a list to collect, in text order, the strings
    that hold a data: URL with an all-base64 payload (see ``secret_scan.without_base64_data``).
    """
    make_encoder = json.encoder.c_make_encoder
    if make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encode = make_encoder({}, _no_default, _string_encoder(clean_strings), None, ":", ",", True,
                          False, True)
    return "".join(encode(value, 0))


def forwarded_json(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)``: the body the proxy sends upstream when it changed
    the client's (switches stripped, stream_options added), built as fast as canonical_json."""
    make_encoder = json.encoder.c_make_encoder
    if make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):  # json.dumps encodes a lone string without the encoder
        return json.encoder.encode_basestring(value)
    encode = make_encoder({}, _no_default, _string_encoder(None), None, ": ", ", ", False, False,
                          True)
    return "".join(encode(value, 0))


def _no_default(value: Any) -> Any:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


@functools.lru_cache(maxsize=16)
def ignored_keys(configured: tuple[str, ...]) -> frozenset[str]:
    """Fields left out of the key: computed once per configuration, not once per request."""
    return ALWAYS_IGNORED_KEYS | frozenset(configured)


def canonical_payload(mode: str, body: Mapping[str, Any], ignore_keys: frozenset[str],
                      extra: Mapping[str, Any] | None = None) -> dict:
    """What the key hashes: the body less the ignored fields, the API's ``extra`` key material
    (request headers that change the answer), and the mode."""
    payload = {name: value for name, value in body.items() if name not in ignore_keys}
    if extra:
        payload.update(extra)
    payload["mode"] = mode
    return payload


# -- volatile text (CACHE_IGNORE_PATTERNS) -----------------------------------------------------

# What a match of an ignore pattern becomes in the text the key is made of.
IGNORED_TEXT = "<cache-ignored>"
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
# Top-level fields that hold the text of a request in some API (system prompts, instructions,
# legacy prompts, Responses input), besides the messages.
_TOP_LEVEL_TEXT = ("system", "instructions", "prompt", "input")


def _text_slots_in(holder: Any, name: Any) -> Iterator[tuple[Any, Any]]:
    value = holder[name]
    if isinstance(value, str):
        yield holder, name
    elif isinstance(value, list):
        for index, part in enumerate(value):
            if isinstance(part, str):
                yield value, index
            elif isinstance(part, dict):
                if part.get("type") in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
                    yield part, "text"
                elif "content" in part:  # a tool result, or a Responses input item
                    yield from _text_slots_in(part, "content")


def message_text_slots(body: Mapping[str, Any]) -> Iterator[tuple[Any, Any]]:
    """(holder, key) of every piece of message text: string contents, text parts of multimodal
    contents (and of tool results), system prompts and instructions, prompts and inputs. Found
    by the shapes the APIs share, so an API added later is covered without a word here."""
    for name in _TOP_LEVEL_TEXT:
        if name in body:
            yield from _text_slots_in(body, name)
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and "content" in message:
                yield from _text_slots_in(message, "content")


@functools.lru_cache(maxsize=16)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(pattern) for pattern in patterns)


@contextlib.contextmanager
def replaced(changes: list[tuple[Any, Any, Any]]) -> Iterator[None]:
    """Set ``holder[key] = value`` for each (holder, key, value) for the duration, then put every
    old value back (the body also goes upstream, unchanged)."""
    saved = []
    try:
        for holder, key, value in changes:
            saved.append((holder, key, holder[key]))
            holder[key] = value
        yield
    finally:
        for holder, key, old in reversed(saved):
            holder[key] = old


def ignored_text_changes(body: Mapping[str, Any], patterns: tuple[str, ...]) -> list[tuple[Any, Any, Any]]:
    """The message text changes CACHE_IGNORE_PATTERNS asks for (none when it is unset)."""
    if not patterns:
        return []
    compiled = _compiled(patterns)
    changes = []
    for holder, key in message_text_slots(body):
        text = holder[key]
        for pattern in compiled:
            text = pattern.sub(IGNORED_TEXT, text)
        if text != holder[key]:
            changes.append((holder, key, text))
    return changes


def canonical_request(settings: Settings, mode: str, body: Mapping[str, Any],
                      clean_strings: list[str] | None = None,
                      changes: Sequence[tuple[Any, Any, Any]] = (),
                      key_extra: Mapping[str, Any] | None = None) -> str:
    """The canonical text the key is made of: ignored fields left out, volatile text replaced,
    the API's ``key_extra`` added, plus any temporary ``changes`` (near matching's
    normalisation)."""
    ignore = ignored_keys(settings.cache_ignore_keys)
    with replaced([*ignored_text_changes(body, settings.cache_ignore_patterns), *changes]):
        return canonical_json(canonical_payload(mode, body, ignore, key_extra), clean_strings)


_HASH_SLICE = 32768


def hash_canonical(canonical: str, partition: str | None = None, namespace: str | None = None) -> str:
    """The cache key: the original's sha256 of the canonical text, unless a namespace
    (X-Cache-Namespace) or a partition (a keyed hash of the client's API key) is given.

    Each prefix starts with a word where every canonical text starts with "{"; a namespace is
    ended by a NUL, which canonical JSON never holds raw, and a partition (hex) by a newline. So
    no request body can produce another namespace's or partition's key, nor an unprefixed one,
    and keys with neither stay the original's, byte for byte.
    """
    prefix = ""
    if partition is not None:
        prefix = f"partition {partition}\n"
    if namespace is not None:
        prefix += f"namespace:{namespace}\x00"
    # The prefix is hashed ahead of the text, not joined to it: no copy of a 400 KB text.
    digest = hashlib.sha256(prefix.encode("utf-8", "surrogatepass"))
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); they must hash, not crash.
    # Encoded in slices: UTF-8 is per character, and slices never split one, so the bytes are
    # the same, while a 400 KB text does not need a fresh 400 KB buffer (page faults) each time.
    for start in range(0, len(canonical), _HASH_SLICE):
        digest.update(canonical[start:start + _HASH_SLICE].encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


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


def contains_credentials(text: str, clean_strings: Sequence[str] = ()) -> bool:
    """The original's labelled check plus bare tokens (keys, JWTs, PEM blocks): see secret_scan."""
    return contains_secret(text, clean_strings)


# -- per-request HTTP controls ---------------------------------------------------------------

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+/-]{0,63}")
_DIGITS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class RequestControls:
    """What the client asked of the cache in standard (and our own) request headers.

    ``no_store``: may be answered from the cache, never written (RFC 9111's request no-store);
    ``no_cache``: never answered from the cache, fetched fresh and the entry replaced;
    ``max_age``: only entries stored at most this many seconds ago are served;
    ``ttl_seconds``: this entry's own lifetime (0 = never expires);
    ``namespace``: a separate key space;
    ``match``: X-Cache-Match (exact or near), None when not given.
    """

    no_store: bool = False
    no_cache: bool = False
    max_age: int | None = None
    ttl_seconds: int | None = None
    namespace: str | None = None
    match: str | None = None


def _header_error(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_request_header")


def parse_cache_control(value: str | None) -> tuple[bool, bool, int | None]:
    """(no_store, no_cache, max_age) from a Cache-Control request header.

    Directive names are case-insensitive and comma separated; unknown directives are ignored as
    HTTP requires; the smallest max-age wins when several are given; a max-age that is not a
    non-negative integer is a client error.
    """
    no_store = no_cache = False
    max_age: int | None = None
    for directive in (value or "").split(","):
        name, _, argument = directive.strip().partition("=")
        name = name.strip().lower()
        if name == "no-store":
            no_store = True
        elif name == "no-cache":
            no_cache = True
        elif name == "max-age":
            argument = argument.strip()
            if len(argument) >= 2 and argument[0] == argument[-1] == '"':
                argument = argument[1:-1]
            if not _DIGITS.fullmatch(argument):
                raise _header_error(
                    f"Cache-Control max-age must be a whole number of seconds, got {argument!r}.")
            seconds = int(argument)
            max_age = seconds if max_age is None else min(max_age, seconds)
    return no_store, no_cache, max_age


def parse_request_controls(headers: Mapping[str, str]) -> RequestControls:
    """Read Cache-Control, X-Cache-TTL, X-Cache-Namespace and X-Cache-Match; a bad value raises
    InvalidRequest."""
    no_store, no_cache, max_age = parse_cache_control(headers.get("Cache-Control"))
    ttl_seconds = None
    ttl_text = (headers.get("X-Cache-TTL") or "").strip()
    if ttl_text:
        if not _DIGITS.fullmatch(ttl_text):
            raise _header_error(
                f"X-Cache-TTL must be a whole number of seconds (0 = never expires), got {ttl_text!r}.")
        ttl_seconds = int(ttl_text)
    namespace = (headers.get("X-Cache-Namespace") or "").strip() or None
    if namespace is not None and not NAMESPACE_PATTERN.fullmatch(namespace):
        raise _header_error(
            "X-Cache-Namespace must be 1-64 characters: letters, digits and . _ : @ + / - "
            "(starting with a letter or digit).")
    match = (headers.get("X-Cache-Match") or "").strip().lower() or None
    if match is not None and match not in MATCH_MODES:
        raise _header_error(f"X-Cache-Match must be exact or near, got {headers.get('X-Cache-Match')!r}.")
    return RequestControls(no_store, no_cache, max_age, ttl_seconds, namespace, match)


def valid_namespace(namespace: str | None) -> bool:
    return namespace is None or NAMESPACE_PATTERN.fullmatch(namespace) is not None


@dataclass(frozen=True)
class Decision:
    """What the cache may do with one request, and why not when it may not."""

    key: str
    canonical: str
    read: bool
    write: bool
    reason: str | None = None
    max_age: int | None = None
    ttl_seconds: int | None = None
    namespace: str | None = None
    partition: str | None = None
    # The request's inline images (their texts count as digests; stored as references), and the
    # strings canonical_json found to be plain base64 data URLs.
    images: tuple[ImageSlot, ...] = ()
    plain_strings: tuple[str, ...] = ()
    match: str = "exact"  # CACHE_MATCH, or the request's X-Cache-Match
    near: Any = None  # near_match.NearRequest, set by the proxy for requests in near mode
    key_extra: Mapping[str, Any] | None = None  # the API's key material beyond the body

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
    controls: RequestControls | None = None,
    images: Sequence[ImageSlot] = (),
    key_extra: Mapping[str, Any] | None = None,
) -> Decision:
    """Derive the key and decide; the first reason that applies wins, as in the original.

    ``partition`` (a keyed hash of the client's API key, see key_partition) is mixed into the
    key when given, so clients with different keys never share entries. ``controls`` (the
    request's Cache-Control / X-Cache-* headers) come after the original's reasons:
    ``no-store`` keeps the read and drops the write, ``no-cache`` drops the read. With neither a
    partition nor a namespace the key is byte-identical to the original server's.
    ``images`` (the endpoint's ``inline_images``): each counts against CACHE_MAX_INPUT_CHARS as
    the length of its digest, not of its base64.
    ``key_extra``: the API's key material beyond the body (see ``canonical_payload``).
    """
    controls = controls or RequestControls()
    clean_strings: list[str] = []  # screenshots, already checked once: see canonical_json
    canonical = canonical_request(settings, mode, body, clean_strings, key_extra=key_extra)
    key = hash_canonical(canonical, partition, controls.namespace)
    images = tuple(images)
    match = controls.match or settings.cache_match

    def bypass(reason: str) -> Decision:
        return Decision(key, canonical, read=False, write=False, reason=reason,
                        namespace=controls.namespace, images=images, match=match)

    if bypass_header:
        return bypass("X-Cache-Bypass requested")
    switch = body_cache_switch(body)
    if not (settings.cache_enabled if switch is None else switch):
        return bypass("cache disabled for request")
    model = body.get("model")
    if not model_is_cacheable(str(model), settings.cache_model_allowlist, settings.cache_model_denylist):
        return bypass(f"model is not cacheable: {model}")
    if len(canonical) > settings.cache_max_input_chars and \
            len(canonical) - image_discount(image_texts(images)) > settings.cache_max_input_chars:
        return bypass("request is too large for cache")
    bare = [slot.holder[slot.key] for slot in images if slot.encoding == "base64"]
    scanned = without_bare_base64(canonical, bare) if bare else canonical
    if contains_credentials(scanned, clean_strings):
        return bypass("request appears to contain credentials or secrets")
    if controls.no_store and controls.no_cache:
        return bypass("Cache-Control: no-store, no-cache requested")
    return Decision(
        key, canonical,
        read=not controls.no_cache,
        write=not controls.no_store,
        reason="Cache-Control: no-store requested" if controls.no_store else None,
        max_age=controls.max_age,
        ttl_seconds=controls.ttl_seconds,
        namespace=controls.namespace,
        partition=partition,
        images=images,
        plain_strings=tuple(clean_strings),
        match=match,
        key_extra=key_extra,
    )
