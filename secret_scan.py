"""Does a request carry a credential? The check that keeps secrets out of the cache.

Two kinds of evidence are searched for in the canonical request text:

* the original server's labelled pattern (``api_key=...``, ``password: "..."``), unchanged, so
  every request it refused to cache is still refused;
* bare tokens whose shape gives them away without a label: provider API keys, cloud and SaaS
  tokens, JWTs, ``Bearer`` credentials and PEM private key blocks.

The scan runs on the request path of every cacheable request, and computer-use requests carry
hundreds of kilobytes of base64 screenshots. So the payloads of base64 ``data:`` URLs are skipped
(found with ``str.find`` and measured with one C pass over bytes, not a regex), and each
pattern, the labelled one included, is only tried, anchored, where its literal prefix occurs.
Every token must stand on its own (no letter, digit, ``_`` or ``-`` right before or after it),
so a run of base64 or an identifier such as ``sk-learn`` is not a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

# The original server's credential check: a label, optional spaces, ':' or '=', an optional quote
# and a value of 8+ characters without quotes or spaces.
CREDENTIAL_PATTERN = re.compile(
    r"(?:api[_-]?key|secret|password|passwd|access[_-]?token|refresh[_-]?token|private[_-]?key)"
    r"\s*[:=]\s*[\"']?[^\"'\s]{8,}",
    re.IGNORECASE,
)

# The label pattern as the scan runs it: on lower-cased text without IGNORECASE, several times
# faster on large bodies (lower() keeps every position and maps each character the
# case-insensitive pattern accepts for a letter to that letter, except the three handled in
# labelled_credential()). It also accepts a JSON-escaped quote before the value: the canonical
# text of a prompt holding `password: "hunter2hunter2"` reads `password: \"hunter2...`, which
# the original pattern missed.
_LABEL_PATTERN = re.compile(
    r"(?:api[_-]?key|secret|password|passwd|access[_-]?token|refresh[_-]?token|private[_-]?key)"
    r"\s*[:=]\s*(?:\\?[\"'])?[^\"'\s]{8,}"
)
_LABEL_PATTERN_ANY_CASE = re.compile(_LABEL_PATTERN.pattern, re.IGNORECASE)
_FOLDS_UNLIKE_LOWER = ("\u0130", "\u0131", "\u017f")  # İ, ı and ſ match i/s under IGNORECASE

# A token starts where no token character precedes it, or right after a JSON escape such as
# the \n of a line break in the canonical text.
_BEFORE = r"(?:(?<![A-Za-z0-9_-])|(?<=\\[nrtbf]))"
_AFTER = r"(?![A-Za-z0-9_-])"
_ALNUM_RUN = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class TokenKind:
    """One shape of bare credential: where to look (literal prefixes) and what to match there."""

    name: str
    prefixes: tuple[str, ...]
    pattern: re.Pattern[str]
    # Extra test on the matched text, for shapes a regex alone states badly.
    looks_random: Callable[[str], bool] = lambda token: True


def _has_random_run(token: str) -> bool:
    """A 16+ run of letters and digits holding a digit: true of every generated key, false of
    identifiers such as sk-learn-model-selection or sk-internationalization."""
    return any(len(run) >= 16 and any(c.isdigit() for c in run) for run in _ALNUM_RUN.findall(token))


def _has_digit_and_letter(token: str) -> bool:
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)


TOKEN_KINDS: tuple[TokenKind, ...] = (
    # OpenAI (legacy sk-<48>, sk-proj-, sk-svcacct-, sk-admin-), OpenRouter (sk-or-v1-<64 hex>),
    # Anthropic (sk-ant-api03-...) and the many providers that copied the sk- shape.
    TokenKind("provider API key", ("sk-",), re.compile(
        _BEFORE + r"sk-[A-Za-z0-9_-]{20,}" + _AFTER), _has_random_run),
    TokenKind("AWS access key id", ("AKIA", "ASIA"), re.compile(
        _BEFORE + r"(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    TokenKind("GitHub token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), re.compile(
        _BEFORE + r"gh[pousr]_[A-Za-z0-9]{30,}" + _AFTER)),
    TokenKind("GitHub token", ("github_pat_",), re.compile(
        _BEFORE + r"github_pat_[A-Za-z0-9_]{22,}" + _AFTER)),
    TokenKind("Slack token", ("xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-"), re.compile(
        _BEFORE + r"xox[baprs]-[A-Za-z0-9-]{10,}" + _AFTER), _has_digit_and_letter),
    TokenKind("Google API key", ("AIza",), re.compile(
        _BEFORE + r"AIza[0-9A-Za-z_-]{35}" + _AFTER)),
    TokenKind("Stripe live key", ("sk_live_", "rk_live_"), re.compile(
        _BEFORE + r"[sr]k_live_[0-9A-Za-z]{16,}" + _AFTER)),
    # header.payload.signature, each base64url; the header is JSON, so it starts with eyJ ('{"').
    TokenKind("JWT", ("eyJ",), re.compile(
        _BEFORE + r"eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}" + _AFTER)),
    # An RFC 6750 token of 16+ characters with a digit and a letter: "Bearer $TOKEN",
    # "Bearer <token>" and "Bearer YOUR_API_KEY_HERE" are instructions, not credentials.
    TokenKind("Bearer token", ("Bearer", "bearer", "BEARER"), re.compile(
        r"(?:(?<![A-Za-z0-9_])|(?<=\\[nrtbf]))(?i:bearer)\s+([A-Za-z0-9._~+/-]{16,}=*)(?![A-Za-z0-9._~+/=-])"),
        _has_digit_and_letter),
    # The BEGIN line followed by key material: a question about the format is not a key.
    TokenKind("PEM private key", ("-----BEGIN ",), re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]{0,400}?[A-Za-z0-9+/]{40}")),
)

_BASE64_MARKER = ";base64,"
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]*")
_BASE64_MARKER_BYTES = _BASE64_MARKER.encode()
_BASE64_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_BASE64_CHARS = tuple(_BASE64_BYTES.decode())


def base64_payload_start(encoded: bytes) -> int:
    """Where the payload of a data: URL starts, when everything after its first ``;base64,`` is
    base64 (a screenshot); -1 otherwise. ``encoded``: an ASCII string's bytes.

    One C pass over the bytes. Canonical JSON makes it for every long string (it also proves the
    payload needs no escaping) and hands the strings it found to the scan, which then confirms
    each payload by comparison instead of a second pass (``find_secret_kind``).
    """
    marker = encoded.find(_BASE64_MARKER_BYTES)
    if marker < 0:
        return -1
    start = marker + len(_BASE64_MARKER_BYTES)
    # All base64 after the marker <=> deleting the base64 bytes leaves just what the head leaves.
    if encoded.translate(None, _BASE64_BYTES) != encoded[:start].translate(None, _BASE64_BYTES):
        return -1
    return start


def without_base64_data(text: str, clean_strings: Sequence[str] = ()) -> str:
    """The text with the payload of every base64 data: URL (screenshots) left out.

    A payload is the whole run of base64 characters after ``;base64,``; each becomes one space,
    so the text on either side cannot join into a token. A run that could hold the start of a
    credential (see ``_opaque_payload``) is kept and scanned like any other text.

    ``clean_strings``: strings known to occur in text in this order, each with a payload that
    ``base64_payload_start`` found clean; where one stands in the text, its run is measured by
    a comparison (memcmp) instead of a check of every character.
    """
    start = text.find(_BASE64_MARKER)
    if start < 0:
        return text
    pieces = []
    kept_from = 0
    checked_to = 0  # text before this has already failed the quick check below
    clean = iter(clean_strings)
    candidate = next(clean, None)
    while start >= 0:
        payload_start = start + len(_BASE64_MARKER)
        payload_end = -1
        if candidate is not None:
            head = candidate.find(_BASE64_MARKER) + len(_BASE64_MARKER)
            string_start = payload_start - head
            string_end = string_start + len(candidate)
            if (string_start >= 0 and text.startswith(candidate, string_start)
                    and not text.startswith(_BASE64_CHARS, string_end)):
                # The text holds the candidate here, whose payload is all base64: the run
                # ends at its end, since the next character is not base64 (or there is none).
                payload_end = string_end
                candidate = next(clean, None)
        if payload_end < 0 and payload_start >= checked_to:
            # A screenshot's payload runs to the quote that ends its JSON string: when everything
            # up to the next quote is base64, the run ends there. Checking that is one C pass
            # over bytes, several times faster than a regex walking the run character by
            # character. A piece that fails is never checked again, so this stays linear.
            quote = text.find('"', payload_start)
            checked_to = len(text) if quote < 0 else quote
            piece = text[payload_start:checked_to]
            if piece.isascii() and not piece.encode("ascii").translate(None, _BASE64_BYTES):
                payload_end = checked_to
        if payload_end < 0:
            payload_end = _BASE64_RUN.match(text, payload_start).end()
        if _opaque_payload(text, payload_start, payload_end):
            pieces.append(text[kept_from:payload_start])
            kept_from = payload_end
        start = text.find(_BASE64_MARKER, payload_end)
    if not pieces:
        return text
    pieces.append(text[kept_from:])
    return " ".join(pieces)


def without_bare_base64(text: str, payloads: Sequence[str]) -> str:
    """The text less each of ``payloads`` (bare base64 image data, such as an Anthropic image's
    ``source.data``, which has no ``;base64,`` marker for ``without_base64_data`` to find).

    Each payload is looked for in text order (one memchr-speed search); where it stands as a whole
    base64 run, with no label start in the characters before it (nothing can reach into it) and
    ``_opaque_payload`` allows, it becomes one space. Anything else is kept and scanned.
    """
    pieces = []
    kept_from = position = 0
    for payload in payloads:
        if len(payload) < _MIN_BARE_PAYLOAD or not payload.isascii() \
                or payload.encode("ascii").translate(None, _BASE64_BYTES):
            continue
        start = text.find(payload, position)
        if start < 0:
            continue
        end = start + len(payload)
        position = end
        before = text[max(0, start - _LOOK_BEFORE_BARE):start].lower()
        if (text.startswith(_BASE64_CHARS, end) or text.endswith(_BASE64_CHARS, 0, start)
                or any(label in before for label in _LABEL_STARTS)):
            continue
        if _opaque_payload(text, start, end):
            pieces.append(text[kept_from:start])
            kept_from = end
    if not pieces:
        return text
    pieces.append(text[kept_from:])
    return " ".join(pieces)


_MIN_BARE_PAYLOAD = 256  # shorter ones cost nothing to scan
_LOOK_BEFORE_BARE = 32  # a label this close could run into the payload: keep it then


# What of each token prefix can stand in a base64 run ("sk" of "sk-", "ghp" of "ghp_").
_TOKEN_STEMS = tuple(sorted({_BASE64_RUN.match(prefix).group() for kind in TOKEN_KINDS
                             for prefix in kind.prefixes} - {""}))
_LONGEST_LABEL_IN_A_RUN = 12  # refreshtoken ("_" and "-" are not base64: they end a run)
_PADDING = 2


def _opaque_payload(text: str, start: int, end: int) -> bool:
    """May the base64 run text[start:end] be left out of the scan without losing a credential?

    Text on either side survives the cut, and any labelled value reaching into the run keeps
    ``;base64,`` (8 characters, enough for a value) before the space that replaces it. Only a
    match starting inside the run could be lost. A labelled one needs ":", "=" or a space after
    its label, and of these only "=" is a base64 character: so the label ends at the run's end
    or at an "=" inside it, which in base64 data is padding (its last two characters). The run
    is kept when an "=" stands anywhere else, or a label starts in its last characters; and when
    it begins like a token (a key pasted right after the marker). A random payload is kept
    about once in a thousand (mostly for an "api" in its last 14 characters), and then costs
    one scan of its text; PNG and JPEG payloads never begin like a token.
    """
    if text.startswith(_TOKEN_STEMS, start):
        return False
    padding = text.find("=", start, end)
    if 0 <= padding < end - _PADDING:
        return False
    tail = text[max(start, end - _PADDING - _LONGEST_LABEL_IN_A_RUN):end].lower()
    return not any(label in tail for label in _LABEL_STARTS)


# Every label the pattern knows starts with one of these: a match can only begin where one occurs.
_LABEL_STARTS = ("api", "secret", "passw", "access", "refresh", "private")


def labelled_credential(text: str) -> bool:
    """The original server's check (CREDENTIAL_PATTERN), also across a JSON-escaped quote."""
    if any(char in text for char in _FOLDS_UNLIKE_LOWER):
        return _LABEL_PATTERN_ANY_CASE.search(text) is not None
    lowered = text.lower()
    # The pattern tried only where a label starts (found with str.find), not at every a, p, r
    # and s of the text as a regex search does.
    match = _LABEL_PATTERN.match
    for label in _LABEL_STARTS:
        position = lowered.find(label)
        while position >= 0:
            if match(lowered, position) is not None:
                return True
            position = lowered.find(label, position + 1)
    return False


# Characters from rarest to most common in ordinary prompts (English prose, code, JSON).
_RARITY = "_-JQZXKVWYUOGHBFMPLDCRNSTIAEzqxjkvbpygfwmucldrhsnioate "


def _gate(prefix: str) -> str:
    """The character of prefix least likely in ordinary text: "_" of "ghp_", "J" of "eyJ"."""
    return min(prefix, key=lambda char: _RARITY.find(char) % (len(_RARITY) + 1))


# Per kind, the gate of each prefix: when it is not in the text, neither is the prefix.
_KIND_GATES = tuple(tuple(_gate(prefix) for prefix in kind.prefixes) for kind in TOKEN_KINDS)
_ALL_GATES = frozenset(gate for gates in _KIND_GATES for gate in gates)


def find_secret_kind(text: str, clean_strings: Sequence[str] = ()) -> str | None:
    """The kind of the first credential found in text ("JWT", "labelled credential", ...).

    Only the kind is returned, never the matched value, so callers may log it.
    ``clean_strings``: see ``without_base64_data``; the verdict is the same without them.
    """
    text = without_base64_data(text, clean_strings)
    if labelled_credential(text):
        return "labelled credential"
    present = {gate for gate in _ALL_GATES if gate in text}
    for kind, gates in zip(TOKEN_KINDS, _KIND_GATES):
        for prefix, gate in zip(kind.prefixes, gates):
            if gate not in present:
                continue  # the prefix cannot occur: one memchr spared a substring search
            position = text.find(prefix)
            while position >= 0:
                match = kind.pattern.match(text, position)
                if match is not None and kind.looks_random(match.group(match.lastindex or 0)):
                    return kind.name
                position = text.find(prefix, position + 1)
    return None


def contains_secret(text: str, clean_strings: Sequence[str] = ()) -> bool:
    """True when text appears to carry a credential of a kind this module knows."""
    return find_secret_kind(text, clean_strings) is not None
