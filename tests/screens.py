"""Desktop-like screenshots made with Pillow, for the computer-use tests and bench/replay.py.

``desktop()`` draws a 1024x768 screen the way an agent sees one: a wallpaper, two windows with
title bars, lines of text, buttons, a file list, a mouse pointer, and a taskbar whose clock sits
in the bottom-right corner. Its arguments are the things that change between two runs or two
steps: the clock, the step (text and pointer move), an open dialog, a highlighted button.
``encoded`` / ``data_url`` turn an image into the bytes an agent sends (PNG, JPEG, WebP, GIF).
"""

from __future__ import annotations

import base64
import io
import json
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 1024, 768
TASKBAR_HEIGHT = 40
# Where the clock is drawn, as fractions of the screen (for CACHE_SCREENSHOT_IGNORE_REGIONS).
CLOCK_REGION = (0.88, 0.95, 1.0, 1.0)
# The button ``desktop(highlight=True)`` redraws: 100 x 84 px, just over 1% of the screen.
BUTTON_BOX = (96, 380, 196, 464)

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def desktop(step: int = 0, *, clock: str = "10:41", dialog: bool = False, highlight: bool = False,
            size: tuple[int, int] = (WIDTH, HEIGHT)) -> Image.Image:
    """One screen of a desktop session at ``step`` (what the agent has done so far)."""
    width, height = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(height):  # wallpaper: a vertical blue gradient
        shade = 90 + 80 * y // height
        draw.line([(0, y), (width, y)], fill=(30, shade // 2 + 40, shade + 60))
    _window(draw, (60, 40, 700, 560), f"Report - step {step}", _editor_lines(step), buttons=True,
            highlight=highlight)
    _window(draw, (560, 180, 980, 640), "Files", _file_lines(step))
    _taskbar(draw, width, height, clock)
    if dialog:
        _dialog(draw, (330, 260, 700, 430))
    _pointer(draw, 120 + 37 * (step % 20), 90 + 23 * (step % 17))
    return image


def _window(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, lines: list[str],
            buttons: bool = False, highlight: bool = False) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0 + 4, y0 + 4, x1 + 4, y1 + 4), fill=(20, 30, 50))  # shadow
    draw.rectangle(box, fill=(248, 248, 246), outline=(90, 90, 90))
    draw.rectangle((x0, y0, x1, y0 + 28), fill=(52, 78, 130))
    draw.text((x0 + 10, y0 + 6), title, fill=(255, 255, 255), font=_font(14))
    for corner, colour in enumerate(((230, 80, 70), (240, 190, 60), (90, 190, 90))):
        cx = x1 - 20 - 22 * corner
        draw.ellipse((cx - 7, y0 + 7, cx + 7, y0 + 21), fill=colour)
    for number, line in enumerate(lines):
        draw.text((x0 + 14, y0 + 40 + 19 * number), line, fill=(30, 30, 30), font=_font(13))
    if buttons:
        _button(draw, BUTTON_BOX, "Save", highlight)
        _button(draw, (220, 400, 320, 440), "Cancel", False)
        draw.rectangle((x0 + 14, y1 - 60, x1 - 14, y1 - 14), fill=(236, 238, 242), outline=(170, 170, 170))
        draw.text((x0 + 24, y1 - 48), "Status: ready", fill=(60, 60, 60), font=_font(13))


def _button(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], label: str, highlight: bool) -> None:
    if highlight:  # pressed: dark blue, white label, a thicker frame
        draw.rectangle(box, fill=(24, 84, 200), outline=(10, 30, 90), width=3)
        draw.text((box[0] + 14, box[1] + 10), label + "d!", fill=(255, 255, 255), font=_font(15))
    else:
        draw.rectangle(box, fill=(222, 224, 228), outline=(120, 120, 120))
        draw.text((box[0] + 16, box[1] + 10), label, fill=(20, 20, 20), font=_font(13))


def _dialog(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle((x0 + 6, y0 + 6, x1 + 6, y1 + 6), fill=(40, 40, 40))
    draw.rectangle(box, fill=(255, 253, 240), outline=(60, 60, 60), width=2)
    draw.rectangle((x0, y0, x1, y0 + 26), fill=(170, 40, 40))
    draw.text((x0 + 10, y0 + 5), "Unsaved changes", fill=(255, 255, 255), font=_font(14))
    draw.text((x0 + 16, y0 + 44), "Save the report before closing?", fill=(20, 20, 20), font=_font(14))
    _button(draw, (x0 + 30, y1 - 70, x0 + 130, y1 - 10), "Yes", False)
    _button(draw, (x0 + 150, y1 - 70, x0 + 250, y1 - 10), "No", False)


def _taskbar(draw: ImageDraw.ImageDraw, width: int, height: int, clock: str) -> None:
    top = height - TASKBAR_HEIGHT
    draw.rectangle((0, top, width, height), fill=(32, 34, 40))
    draw.rectangle((6, top + 6, 90, height - 6), fill=(60, 110, 200))
    draw.text((18, top + 11), "Start", fill=(255, 255, 255), font=_font(14))
    for number in range(5):
        x = 110 + 46 * number
        draw.rectangle((x, top + 6, x + 36, height - 6), fill=(70 + 20 * number, 80, 100))
    draw.text((width - 80, top + 4), clock, fill=(235, 235, 235), font=_font(14))
    draw.text((width - 92, top + 21), "2026-12-05", fill=(200, 200, 200), font=_font(11))


def _pointer(draw: ImageDraw.ImageDraw, x: int, y: int) -> None:
    draw.polygon([(x, y), (x, y + 18), (x + 5, y + 14), (x + 9, y + 22), (x + 12, y + 20),
                  (x + 8, y + 12), (x + 14, y + 12)], fill=(255, 255, 255), outline=(0, 0, 0))


def _editor_lines(step: int) -> list[str]:
    topics = ["quarterly revenue", "open invoices", "travel costs", "hiring plan", "server bills",
              "customer churn", "support tickets", "release notes"]
    lines = [f"Step {step}: the agent reviews {topics[step % len(topics)]}."]
    for number in range(14):
        topic = topics[(step + number) % len(topics)]
        lines.append(f"{number + 1:2d}. {topic.title()} - row {(step * 7 + number * 13) % 97:2d} checked, "
                     f"total {(step + 3) * (number + 11) * 37 % 9973:5d} EUR")
    return lines


def _file_lines(step: int) -> list[str]:
    return [f"{'>' if number == step % 18 else ' '} report-{(step + number) % 40:02d}.xlsx   "
            f"{(number * 131 + step) % 900 + 12:4d} KB" for number in range(18)]


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    """The image as a file in ``fmt`` (PNG, JPEG, WEBP, GIF); JPEG defaults to quality 90."""
    if fmt == "JPEG":
        options.setdefault("quality", 90)
    if fmt == "GIF":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def data_url(image: Image.Image, fmt: str = "PNG", **options) -> str:
    """The image as an ``image_url`` data URL, as agents send screenshots."""
    payload = base64.b64encode(encoded(image, fmt, **options)).decode("ascii")
    return f"data:{MEDIA_TYPES[fmt]};base64,{payload}"


def changed_fraction(first: Image.Image, second: Image.Image, threshold: int = 0) -> float:
    """The exact share of pixels whose colour differs by more than ``threshold`` in any channel:
    what a test asserts a perturbation really changed."""
    from PIL import ImageChops
    difference = ImageChops.difference(first.convert("RGB"), second.convert("RGB"))
    channels = [band.point(lambda value: 255 if value > threshold else 0) for band in difference.split()]
    mask = ImageChops.lighter(ImageChops.lighter(channels[0], channels[1]), channels[2])
    return mask.histogram()[255] / (first.width * first.height)


# -- a computer-use agent's requests --------------------------------------------------------------

COMPUTER_TOOL = {"type": "function", "function": {
    "name": "computer", "description": "Use the mouse and keyboard of the desktop.",
    "parameters": {"type": "object", "properties": {
        "action": {"type": "string"}, "x": {"type": "integer"}, "y": {"type": "integer"}},
        "required": ["action"]}}}
KEPT_SCREENSHOTS = 3


def step_action(step: int) -> dict:
    """What the agent does at ``step`` (the model's tool call arguments)."""
    return {"action": "left_click", "x": 120 + 37 * (step % 20), "y": 90 + 23 * (step % 17)}


def agent_request(shots: list[str], call_ids: list[str], *, model: str = "test/model-a",
                  task: str = "Review the report and save it.", **extra) -> dict:
    """The chat request a computer-use agent sends after ``len(call_ids)`` actions: ``shots[0]``
    is the first screen, ``shots[i]`` the screen after action i (tool call ``call_ids[i-1]``).
    Only the last KEPT_SCREENSHOTS screenshots are sent; older ones become a line of text."""
    assert len(shots) == len(call_ids) + 1
    kept_from = len(shots) - KEPT_SCREENSHOTS

    def screen(index: int) -> dict:
        if index < kept_from:
            return {"role": "user", "content": f"(screenshot {index} omitted)"}
        return {"role": "user", "content": [
            {"type": "text", "text": f"Screenshot {index}."},
            {"type": "image_url", "image_url": {"url": shots[index], "detail": "high"}}]}

    messages = [{"role": "system", "content": "You operate a desktop with the computer tool. "
                                              "Answer with one tool call per step."},
                {"role": "user", "content": task}, screen(0)]
    for index, call_id in enumerate(call_ids, start=1):
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": "computer", "arguments": json.dumps(step_action(index - 1))}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": "done"})
        messages.append(screen(index))
    return {"model": model, "messages": messages, "tools": [COMPUTER_TOOL], "temperature": 0, **extra}


def tool_call_answer(step: int, call_id: str, completion_id: str, model: str = "test/model-a") -> dict:
    """The upstream's answer to the request of ``step``: one computer tool call with a fresh id."""
    return {"id": completion_id, "object": "chat.completion", "created": 1700000000 + step,
            "model": model, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "refusal": None, "tool_calls": [{
                    "id": call_id, "type": "function", "function": {
                        "name": "computer", "arguments": json.dumps(step_action(step))}}]}}],
            "usage": {"prompt_tokens": 2400 + step, "completion_tokens": 21, "total_tokens": 2421 + step}}


# -- the cost of a near lookup (tests/test_screen_match.py and bench/replay.py) ----------------

def store_near_candidates(store, count: int, group: str = "group") -> None:
    """``count`` entries in one near group, each with the fingerprints of screens 0-2."""
    from cache_store import NearRecord, NewEntry
    from images import encode_prints, screen_print
    prints = encode_prints([screen_print(encoded(desktop(step))) for step in range(3)])
    for number in range(count):
        store.put(NewEntry(f"candidate-{number}", "chat", "test/model-a", '{"mode":"chat"}', '{"choices":[1]}'),
                  near=NearRecord(group, prints))


def timed_near_lookup(store, settings, attempt: int, group: str = "group") -> tuple[float, float]:
    """(a near lookup with three screenshots never seen before against the group's candidates,
    decoding those three screenshots alone with Pillow), in seconds. ``attempt`` sets the clock,
    so each attempt's screenshots are new."""
    import time

    from near_match import NearMatcher, NearRequest
    matcher = NearMatcher(settings, store)  # a fresh one remembers no fingerprint
    files = [encoded(desktop(step, clock=f"09:{attempt % 60:02d}")) for step in range(3)]
    near = NearRequest(matcher, lambda: group, [("image/png", base64.b64encode(data).decode())
                                                for data in files])
    began = time.perf_counter()
    found = matcher.find(near)
    lookup = time.perf_counter() - began
    if found is None or not found.key.startswith("candidate-"):
        raise AssertionError("the near lookup found no candidate")
    began = time.perf_counter()
    for data in files:
        Image.open(io.BytesIO(data)).load()
    return lookup, time.perf_counter() - began
