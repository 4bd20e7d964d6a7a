"""Near matching (CACHE_MATCH=near / X-Cache-Match: near): a request that misses exactly may be
answered by a stored entry whose request is the same once tool-call ids are renumbered and whose
screenshots show nearly the same screen.

The store indexes each entry stored in near mode under its *near group*: the SHA-256 of the
request normalised (every tool-call id replaced by its order of first appearance, every inline
image by one placeholder, volatile text as for the key) together with its partition and
namespace; mode and model are in the text. Inside a group the candidates' screenshots are
compared with the request's (images.py): each must have the same size and at most
CACHE_SCREENSHOT_TOLERANCE of its area changed; the closest candidate wins.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

from cache_policy import Decision, canonical_request, hash_canonical
from cache_store import CachedEntry, NearRecord, SQLiteStore
from config import Settings
from images import ScreenPrint, changed_share, decode_prints, decoded_image, encode_prints, screen_print
from images import slot_payload
from recent_items import RecentItems

CANDIDATES = 16
IMAGE_PLACEHOLDER = "<image>"
_UNREADABLE = "unreadable"  # remembered for an image Pillow could not read


class NearRequest:
    """One request in near mode: its group and its screenshots' fingerprints, each worked out
    when first needed (an exact hit needs neither)."""

    def __init__(self, matcher: "NearMatcher", make_group: Callable[[], str],
                 payloads: list[tuple[str, str]]):
        self.matcher = matcher
        self._make_group = make_group
        self._group: str | None = None
        self._payloads = payloads
        self._prints: list[ScreenPrint] | None = None
        self._made = False

    @property
    def group(self) -> str:
        if self._group is None:
            self._group = self._make_group()
        return self._group

    def prints(self) -> list[ScreenPrint] | None:
        """Each image's fingerprint, or None when any cannot be read (no near matching then)."""
        if not self._made:
            self._prints = self.matcher.prints_of(self._payloads)
            self._made = True
        return self._prints

    def record(self) -> NearRecord | None:
        """What the store indexes with the entry; None when an image cannot be read."""
        prints = self.prints()
        return None if prints is None else NearRecord(self.group, encode_prints(prints))


class NearMatcher:
    """Near lookups for one proxy. Agents resend their last few screenshots with every step, so
    fingerprints are remembered by image digest: a step usually decodes one new screenshot."""

    def __init__(self, settings: Settings, store: SQLiteStore):
        self.settings = settings
        self.store = store
        # ~50 KB each for a 1024x768 screen: a few agents' last screens, a few MB per worker.
        self._prints = RecentItems(128)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._pool_lock = threading.Lock()

    def _decoders(self) -> ThreadPoolExecutor:
        """Threads that decode a request's new screenshots side by side (decoding releases the
        GIL), made on first use in each process: threads do not survive a fork."""
        with self._pool_lock:
            if self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="screen-decoder")
                self._pool_pid = os.getpid()
            return self._pool  # type: ignore[return-value]

    def request(self, endpoint: Any, body: Mapping[str, Any], decision: Decision,
                partition: str | None) -> NearRequest:
        """The near view of a request whose exact key is ``decision.key``."""
        images = [(slot, found) for slot in decision.images
                  if (found := slot_payload(slot)) is not None]

        def group() -> str:
            ids: dict[str, str] = {}
            changes: list[tuple[Any, Any, Any]] = []
            for slot in endpoint.tool_call_ids(body):
                number = ids.setdefault(slot.holder[slot.key], f"<tool-call-{len(ids) + 1}>")
                changes.append((slot.holder, slot.key, number))
            # Only images compared by what they show are blanked; any other stays as text. A
            # media type kept beside the image goes too: re-encoding the screen changes it.
            for slot, _ in images:
                changes.append((slot.holder, slot.key, IMAGE_PLACEHOLDER))
                if slot.media_type_key is not None:
                    changes.append((slot.holder, slot.media_type_key, IMAGE_PLACEHOLDER))
            normalised = canonical_request(self.settings, endpoint.mode, body, changes=changes,
                                           key_extra=decision.key_extra)
            return hash_canonical("near\n" + normalised, partition, decision.namespace)

        return NearRequest(self, group, [found for _, found in images])

    def prints_of(self, payloads: Sequence[tuple[str, str]]) -> list[ScreenPrint] | None:
        """The fingerprint of each (media type, base64) image, remembered by the digest of its
        base64; None when any cannot be read."""
        digests = [hashlib.sha256(payload.encode("utf-8", "surrogatepass")).digest()
                   for _, payload in payloads]
        prints = [self._prints.get(digest) for digest in digests]
        missing = [index for index, found in enumerate(prints) if found is None]
        made = self._decoded([payloads[index][1] for index in missing])
        for index, made_print in zip(missing, made):
            prints[index] = made_print if made_print is not None else _UNREADABLE
            self._prints.put(digests[index], prints[index])
        if any(found is _UNREADABLE for found in prints):
            return None
        return prints  # type: ignore[return-value]

    def _decoded(self, payloads: list[str]) -> list[ScreenPrint | None]:
        def fingerprint(payload: str) -> ScreenPrint | None:
            data = decoded_image(payload)
            return None if data is None else screen_print(data)

        if len(payloads) < 2:
            return [fingerprint(payload) for payload in payloads]
        return list(self._decoders().map(fingerprint, payloads))

    def find(self, near: NearRequest, max_age: int | None = None) -> CachedEntry | None:
        """The closest live entry of the request's group whose screenshots all qualify, or None.

        Raises StoreError like the store does."""
        candidates = self.store.near_candidates(near.group, CANDIDATES)
        if not candidates:
            return None
        mine = near.prints()
        if mine is None:
            return None
        tolerance = self.settings.cache_screenshot_tolerance
        regions = self.settings.cache_screenshot_ignore_regions
        qualified = []
        for order, (key, blob) in enumerate(candidates):
            theirs = decode_prints(blob)
            if theirs is None or len(theirs) != len(mine):
                continue
            distance = 0.0
            for own, other in zip(mine, theirs):
                share = changed_share(own, other, regions)
                if share > tolerance:
                    break
                distance += share
            else:
                qualified.append((distance, order, key))  # newest first among equals
        for _, _, key in sorted(qualified):
            entry = self.store.get(key, max_age=max_age)
            if entry is not None:
                return entry
        return None
