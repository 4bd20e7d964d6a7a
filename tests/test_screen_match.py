"""What near matching sees of a screenshot (images.py), proved on real Pillow images: a clock that
ticked stays within the default tolerance, a changed button or a dialog (>= 1% of the area) never
does, re-encoding is not a change, and a near lookup costs about what decoding its screenshots
costs. Also the store's near index, and the stored image references."""

from __future__ import annotations

import base64

import pytest

import screens
from cache_store import NearRecord, NewEntry, SQLiteStore
from config import load_settings
from images import changed_share, decode_prints, encode_prints, screen_print
from near_match import CANDIDATES

TOLERANCE = 0.002  # the default CACHE_SCREENSHOT_TOLERANCE
BASE = screens.desktop(5)
BASE_PRINT = screen_print(screens.encoded(BASE))


def share_against_base(image, fmt="PNG", **options) -> float:
    return changed_share(BASE_PRINT, screen_print(screens.encoded(image, fmt, **options)))


@pytest.mark.parametrize("clock", ["10:42", "11:58", "23:59"])
def test_changed_share__a_clock_that_ticked_is_within_the_default_tolerance(clock):
    ticked = screens.desktop(5, clock=clock)
    assert 0 < screens.changed_fraction(BASE, ticked) < TOLERANCE  # the pixels really changed
    assert 0 < share_against_base(ticked) <= TOLERANCE


@pytest.mark.parametrize("change", [{"highlight": True}, {"dialog": True}])
def test_changed_share__a_change_of_one_percent_or_more_is_past_the_tolerance(change):
    changed = screens.desktop(5, **change)
    assert screens.changed_fraction(BASE, changed, threshold=10) >= 0.01
    share = share_against_base(changed)
    assert share >= 0.01 > TOLERANCE
    assert share_against_base(changed, "JPEG", quality=85) >= 0.01


def patched(box: tuple[int, int, int, int], shade: tuple[int, int, int]):
    from PIL import ImageDraw
    image = BASE.copy()
    ImageDraw.Draw(image).rectangle(box, fill=shade)
    return image


@pytest.mark.parametrize("offset", [0, 1, 2, 3])
@pytest.mark.parametrize("shade", [(20, 20, 20), (200, 60, 60), (90, 160, 255)])
def test_changed_share__a_solid_one_percent_patch_anywhere_measures_near_one_percent(offset, shade):
    """89 x 89 pixels (1.007% of 1024x768) over the text of a window, off the 4-pixel grid by
    ``offset``: the blocks it covers count, those it only grazes may not, so it measures a
    little under 1%: still four times the default tolerance."""
    share = share_against_base(patched((300 + offset, 200 + offset, 388 + offset, 288 + offset), shade))
    assert 0.008 <= share <= 0.012


def test_changed_share__a_patch_of_the_background_colour_counts_what_it_covers_up():
    """White over a near-white window: only the text it erases really changed (a brightness step
    of 7 is not a change), and that is still more than the default tolerance."""
    image = patched((300, 200, 388, 288), (255, 255, 255))
    assert screens.changed_fraction(BASE, image, threshold=10) > TOLERANCE
    assert share_against_base(image) > 2 * TOLERANCE


def test_changed_share__a_small_patch_measures_about_its_size():
    assert 0.0006 <= share_against_base(patched((801, 601, 840, 615), (255, 0, 255))) <= 0.0012  # 0.076%


def test_changed_share__the_next_step_of_the_agent_is_a_different_screen():
    assert share_against_base(screens.desktop(6)) > 0.01


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {"quality": 85}), ("JPEG", {"quality": 95}), ("WEBP", {"quality": 90}),
    ("WEBP", {"lossless": True}), ("GIF", {}), ("PNG", {"optimize": True}),
])
def test_changed_share__re_encoding_the_same_screen_is_no_change(fmt, options):
    assert share_against_base(BASE, fmt, **options) <= TOLERANCE / 10


def test_changed_share__re_encoded_and_ticked_together_still_within_tolerance():
    assert share_against_base(screens.desktop(5, clock="12:07"), "JPEG", quality=85) <= TOLERANCE


def test_changed_share__a_different_size_never_matches():
    small = screen_print(screens.encoded(screens.desktop(5, size=(1024, 700))))
    assert changed_share(BASE_PRINT, small) == 1.0


def test_changed_share__ignored_regions_never_count():
    ticked = screen_print(screens.encoded(screens.desktop(5, clock="23:59")))
    assert changed_share(BASE_PRINT, ticked) > 0
    assert changed_share(BASE_PRINT, ticked, [screens.CLOCK_REGION]) == 0
    dialog = screen_print(screens.encoded(screens.desktop(5, dialog=True)))
    assert changed_share(BASE_PRINT, dialog, [screens.CLOCK_REGION]) >= 0.01


@pytest.mark.parametrize("region", [(0.5, 0.5, 0.5001, 0.5001), (0.0, 0.0, 0.0001, 1.0),
                                    (0.9999, 0.9999, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)])
def test_changed_share__any_region_even_thinner_than_a_pixel_is_accepted(region):
    ticked = screen_print(screens.encoded(screens.desktop(5, clock="23:59")))
    share = changed_share(BASE_PRINT, ticked, [region])
    assert share == (0 if region == (0.0, 0.0, 1.0, 1.0) else changed_share(BASE_PRINT, ticked))


def declaring(png: bytes, width: int, height: int) -> bytes:
    """The PNG with its header claiming another size (and a CRC to match)."""
    import struct
    import zlib
    header = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + header + struct.pack(">I", zlib.crc32(header)) + png[33:]


@pytest.mark.parametrize("width, height", [(5000, 5000), (40000, 40000)])
def test_screen_print__a_header_claiming_a_huge_image_is_never_decoded(width, height):
    import time
    bomb = declaring(screens.encoded(screens.desktop(0, size=(64, 48))), width, height)
    began = time.perf_counter()
    assert screen_print(bomb) is None
    assert time.perf_counter() - began < 0.5  # refused from the header, nothing decoded


def test_screen_print__unreadable_or_oversized_images_have_none(monkeypatch):
    assert screen_print(b"not an image at all") is None
    assert screen_print(screens.encoded(BASE)[:2000]) is None  # truncated
    import images
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    assert screen_print(screens.encoded(BASE)) is None


def test_prints__encoded_small_and_decoded_back():
    prints = [BASE_PRINT, screen_print(screens.encoded(screens.desktop(1, size=(800, 600))))]
    blob = encode_prints(prints)
    assert decode_prints(blob) == prints
    assert len(blob) < 16_000
    assert decode_prints(b"NF1garbage") is None and decode_prints(b"") is None
    assert decode_prints(encode_prints([])) == []


# -- the near index in the SQLite store -----------------------------------------------------------------

def entry(key: str) -> NewEntry:
    return NewEntry(key, "chat", "test/model-a", '{"mode":"chat"}', '{"choices":[1]}')


def test_near_index__evicted_and_cleared_with_its_entries(tmp_path):
    """The contract's near tests are in test_cache_store.py; eviction is SQLite's own."""
    store = SQLiteStore(str(tmp_path / "near.sqlite3"), hit_flush_seconds=0, max_entries=2)
    for key in ("a", "b", "c", "d", "e"):
        store.put(entry(key), near=NearRecord("g", key.encode()))
    store.evict()
    assert len(store.near_candidates("g")) == 2
    store.clear()
    (rows,) = store._db().execute("SELECT count(*) FROM near_index").fetchone()
    assert rows == 0
    store.close()


# -- the cost of a near lookup --------------------------------------------------------------------

def test_near_lookup__costs_about_what_decoding_its_screenshots_costs(tmp_path):
    """Three new screenshots against 16 candidates: the decoding is the work (Pillow's), the
    comparisons add little. Measured against the decoding itself, in the same moments, so a
    busy machine slows both alike; bench/replay.py reports the time itself (budget: 30 ms)."""
    store = SQLiteStore(str(tmp_path / "near.sqlite3"), hit_flush_seconds=0)
    settings = load_settings({})
    screens.store_near_candidates(store, CANDIDATES)
    lookups, decodes = zip(*(screens.timed_near_lookup(store, settings, attempt) for attempt in range(8)))
    assert min(lookups) <= 1.5 * min(decodes), (lookups, decodes)
    store.close()


# -- where images are, and what is stored instead ---------------------------------------------

def test_chat_inline_images__data_urls_only_in_document_order():
    from apis.chat import CHAT
    from apis.completions import COMPLETION
    body = {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                     {"type": "text", "text": "data:image/png;base64,BBBB"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "data:image/jpeg;base64,CCCC"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}, {"id": "c2"}]},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"}, "not a message"]}
    assert [slot.holder[slot.key] for slot in CHAT.inline_images(body)] == [
        "data:image/png;base64,AAAA", "data:image/jpeg;base64,CCCC"]
    assert [slot.holder[slot.key] for slot in CHAT.tool_call_ids(body)] == ["c1", "c2", "c2"]
    assert list(COMPLETION.inline_images({"prompt": "x"})) == []


def test_with_image_references__the_canonical_text_with_each_image_as_its_reference():
    import hashlib
    import json
    from cache_policy import canonical_json
    from images import holds_image_references, image_discount, image_texts, with_image_references
    from apis.chat import CHAT
    png = screens.encoded(BASE)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    odd = 'data:image/png;name="a";base64,' + base64.b64encode(png).decode()  # a head JSON escapes
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "same again:"},
        {"type": "image_url", "image_url": {"url": url}}, {"type": "image_url", "image_url": {"url": odd}}]}]}
    slots = list(CHAT.inline_images(body))
    canonical = canonical_json(body)

    stored = json.loads(with_image_references(canonical, slots))

    reference = {"base64_sha256": hashlib.sha256(base64.b64encode(png)).hexdigest(), "bytes": len(png),
                 "media_type": "image/png"}
    parts = stored["messages"][0]["content"]
    assert parts[0]["image_url"]["url"] == parts[2]["image_url"]["url"] == reference
    assert parts[3]["image_url"]["url"] == odd  # not plain: kept as it was
    assert holds_image_references(stored) and not holds_image_references(body)
    assert image_texts(slots) == [url, url]
    assert len(canonical) - image_discount(image_texts(slots)) == len(canonical) - 2 * (len(url) + 2 - 64)
