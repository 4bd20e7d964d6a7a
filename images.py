"""Inline images in requests: where they are, what is stored instead of them, and what they show.

Every API says where its requests keep inline images (``inline_images(body)`` -> ``ImageSlot``)
and tool-call ids (``tool_call_ids(body)`` -> ``IdSlot``). With those this module:

* measures a request for CACHE_MAX_INPUT_CHARS with each image counted as the length of its
  digest (``image_discount``), so screenshots never make a request "too large";
* writes the stored request with each image as a short reference (the SHA-256 of its base64,
  its media type and byte size) instead of the base64 (``with_image_references``); the key still
  hashes the pixels;
* makes the per-image fingerprints near matching compares (``screen_print``, ``changed_share``):
  the image decoded with Pillow, in grey, averaged over 4 x 4 pixel blocks. Compression noise
  (PNG vs JPEG, JPEG quality) moves a block's average by a level or two; a block counts as
  changed when its average moves by more than ``CHANGE_LEVELS``. The changed share of the image
  is the share of changed blocks, less those inside the ignored regions.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from PIL import Image, ImageChops, ImageDraw


class ImageSlot(NamedTuple):
    """One inline image inside a request body: holder[key] is its text."""
    holder: dict            # the dict holding the text (mutable: near/digest code replaces holder[key])
    key: str                # "url" / "image_url" (a data: URL) or "data" (bare base64)
    encoding: str           # "data_url" (data:image/png;base64,...) or "base64" (bare)
    media_type: str | None  # for "base64" slots, e.g. Anthropic's source.media_type; None for data URLs
    # Where the holder keeps that media type (Anthropic: "media_type"), or None. Near matching
    # blanks it with the image: the same screen re-encoded (PNG -> JPEG) changes it too.
    media_type_key: str | None = None


class IdSlot(NamedTuple):
    """One tool-call id inside a request body: holder[key] is the id string."""
    holder: dict
    key: str


# An image counts as this many characters against CACHE_MAX_INPUT_CHARS: a SHA-256 in hex.
DIGEST_CHARS = 64
_BASE64_MARKER = ";base64,"
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# The keys of a stored image reference, in canonical (sorted) order.
REFERENCE_KEYS = ("base64_sha256", "bytes", "media_type")


def data_url_image(text: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a ``data:image/...;base64,`` URL, or None."""
    if not text.startswith("data:"):
        return None
    marker = text.find(_BASE64_MARKER, 5, 200)
    if marker < 0:
        return None
    return text[5:marker], text[marker + len(_BASE64_MARKER):]


def slot_payload(slot: ImageSlot) -> tuple[str, str] | None:
    """(media type, base64 payload) of an image slot, or None when it holds no inline image."""
    text = slot.holder.get(slot.key)
    if not isinstance(text, str):
        return None
    if slot.encoding == "data_url":
        return data_url_image(text)
    return (slot.media_type or "application/octet-stream"), text


# Characters JSON writes as they are (canonical_json's string fast path uses the same set).
PLAIN_JSON_ASCII = bytes(byte for byte in range(128) if byte >= 0x20 and byte not in b'"\\')


def _plain_image(text: str, payload: str) -> bool:
    """An all-base64 payload after a head that JSON writes as it is: the image's JSON string in
    the canonical text is then exactly ``"text"``."""
    if not text.isascii():
        return False
    encoded = text.encode("ascii")
    head = len(text) - len(payload)
    return (not encoded[head:].translate(None, _BASE64_ALPHABET)
            and not encoded[:head].translate(None, PLAIN_JSON_ASCII))


def image_texts(slots: Iterable[ImageSlot]) -> list[str]:
    """The texts (data URLs or bare base64) of the slots that hold a plain base64 image."""
    texts = []
    for slot in slots:
        found = slot_payload(slot)
        if found is not None and _plain_image(slot.holder[slot.key], found[1]):
            texts.append(slot.holder[slot.key])
    return texts


def image_discount(texts: Sequence[str]) -> int:
    """How much shorter the canonical text is when each image counts as a digest: its JSON
    string (the text between two quotes: clean base64 needs no escaping) becomes DIGEST_CHARS."""
    return sum(len(text) + 2 - DIGEST_CHARS for text in texts)


def decoded_image(payload: str) -> bytes | None:
    try:
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def image_reference(media_type: str, payload: str) -> dict:
    """What the stored request keeps of an image: enough to recognise it, never the pixels.

    The digest is of the base64 text as sent (``printf %s "$payload" | sha256sum``): decoding it
    first would cost a miss more than the rest of its store."""
    padding = 2 if payload.endswith("==") else 1 if payload.endswith("=") else 0
    return {"base64_sha256": hashlib.sha256(payload.encode("ascii")).hexdigest(),
            "bytes": len(payload) * 3 // 4 - padding, "media_type": media_type}


def is_image_reference(value: object) -> bool:
    return isinstance(value, dict) and tuple(sorted(value)) == REFERENCE_KEYS


def holds_image_references(value: object) -> bool:
    """Whether a stored request (parsed) has images stored as references."""
    if is_image_reference(value):
        return True
    if isinstance(value, dict):
        return any(holds_image_references(item) for item in value.values())
    if isinstance(value, list):
        return any(holds_image_references(item) for item in value)
    return False


def with_image_references(canonical: str, slots: Iterable[ImageSlot], plain: Sequence[str] = ()) -> str:
    """The canonical request text with each plain inline image's JSON string replaced by the
    canonical JSON of its reference. Everything else is the canonical text, unchanged.

    ``plain``: strings canonical_json already found plain (its ``clean_strings``), not checked
    again. Each occurrence is found by a short head of the string and confirmed by one
    comparison: searching for (or replacing) a 100 KB needle costs a pass over it to prepare."""
    known_plain = {id(text) for text in plain}
    references: dict[str, str] = {}
    for slot in slots:
        found = slot_payload(slot)
        text = slot.holder.get(slot.key)
        if found is None or text in references:
            continue
        if id(text) in known_plain or _plain_image(text, found[1]):
            references[text] = json.dumps(image_reference(*found), sort_keys=True,
                                          separators=(",", ":"), ensure_ascii=False)
    spans = []
    for text, reference in references.items():
        quoted_head, end = '"' + text[:_FIND_HEAD], 0
        while (start := canonical.find(quoted_head, end)) >= 0:
            end = start + len(text) + 2
            if canonical.startswith(text, start + 1) and canonical.startswith('"', end - 1):
                spans.append((start, end, reference))
            else:
                end = start + 1
    if not spans:
        return canonical
    pieces, kept_from = [], 0
    for start, end, reference in sorted(spans):
        if start < kept_from:  # inside one already replaced (an image's text within another's)
            continue
        pieces += [canonical[kept_from:start], reference]
        kept_from = end
    pieces.append(canonical[kept_from:])
    return "".join(pieces)


_FIND_HEAD = 96


# -- what an image shows -----------------------------------------------------------------------

BLOCK = 4
# A block's average brightness (0-255) must move by more than this to count as changed: JPEG at
# quality 85 moves it by a level or two, a redrawn glyph or control by tens.
CHANGE_LEVELS = 10
# Images larger than a 5K screen are not decoded for near matching: a decompression-bomb guard
# (a small PNG can declare a huge image) and a bound on what one request can make a worker do.
MAX_PIXELS = 5120 * 3200
_PRINT_VERSION = b"NF1"
_PRINT_HEADER = struct.Struct("<II")


@dataclass(frozen=True)
class ScreenPrint:
    """One image as near matching sees it: its size and its grey block averages."""

    width: int
    height: int
    blocks: bytes  # ceil(width / BLOCK) x ceil(height / BLOCK) averages, row by row

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.width // BLOCK), -(-self.height // BLOCK)


def screen_print(data: bytes) -> ScreenPrint | None:
    """The fingerprint of an image file (PNG, JPEG, WebP, GIF: the first frame), or None when
    Pillow cannot read it or it is larger than MAX_PIXELS.

    The size is checked after the header is read and before any pixel is decoded. The bytes are
    the client's: whatever a damaged file makes a Pillow plugin raise only means no fingerprint."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return None
            image.load()
            grey = image.convert("L")
    except Exception:  # noqa: BLE001 - see above; Image.DecompressionBombError included
        return None
    return ScreenPrint(grey.width, grey.height, grey.reduce(BLOCK).tobytes())


def encode_prints(prints: Sequence[ScreenPrint]) -> bytes:
    """The fingerprints of one request, as the store keeps them (compressed: screens are flat)."""
    header = b"".join(_PRINT_HEADER.pack(p.width, p.height) for p in prints)
    body = zlib.compress(b"".join(p.blocks for p in prints), 6)
    return _PRINT_VERSION + struct.pack("<H", len(prints)) + header + body


def decode_prints(blob: bytes) -> list[ScreenPrint] | None:
    """``encode_prints`` undone; None for bytes it did not write."""
    try:
        if blob[:3] != _PRINT_VERSION:
            return None
        (count,) = struct.unpack_from("<H", blob, 3)
        offset = 5 + count * _PRINT_HEADER.size
        sizes = [_PRINT_HEADER.unpack_from(blob, 5 + n * _PRINT_HEADER.size) for n in range(count)]
        body = zlib.decompress(blob[offset:])
    except (struct.error, zlib.error, TypeError):
        return None
    prints, position = [], 0
    for width, height in sizes:
        cells = -(-width // BLOCK) * -(-height // BLOCK)
        prints.append(ScreenPrint(width, height, body[position:position + cells]))
        position += cells
    return prints if position == len(body) else None


Region = tuple[float, float, float, float]


def changed_share(first: ScreenPrint, second: ScreenPrint, ignore: Sequence[Region] = ()) -> float:
    """The share of the image area whose blocks changed (1.0 for images of different sizes)."""
    if (first.width, first.height) != (second.width, second.height):
        return 1.0
    grid = first.grid
    difference = ImageChops.difference(Image.frombytes("L", grid, first.blocks),
                                       Image.frombytes("L", grid, second.blocks))
    if ignore:
        draw = ImageDraw.Draw(difference)
        for region in ignore:
            blocks = _blocks_touched(region, first.width, first.height)
            if blocks is not None:
                draw.rectangle(blocks, fill=0)
    changed = sum(difference.histogram()[CHANGE_LEVELS + 1:])
    return changed / (grid[0] * grid[1])


def _blocks_touched(region: Region, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The blocks (first and last column and row) holding any pixel of a region given as
    fractions; None when it holds no whole pixel. Every block it touches is left out, so no
    pixel of it counts."""
    x0, y0, x1, y1 = region
    left, top = math.floor(x0 * width), math.floor(y0 * height)
    right, bottom = min(math.ceil(x1 * width), width), min(math.ceil(y1 * height), height)
    if right <= left or bottom <= top:
        return None
    return left // BLOCK, top // BLOCK, (right - 1) // BLOCK, (bottom - 1) // BLOCK
