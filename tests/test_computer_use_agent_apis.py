"""Computer use through the APIs the agents really call, end to end: Claude's computer use on the
Anthropic Messages API (screenshots as base64 image blocks in ``tool_result``) and OpenAI's on the
Responses API (``computer_call_output`` screenshots as data URLs), driven by the official SDKs
over HTTP with real Pillow screenshots. Every screenshot rule of tests/test_computer_use.py
(chat) holds for both: images count as digests and are stored as references, near matching
forgives a clock, re-encoding and new tool-call ids but not a changed screen, a near hit
replays as a stream, and CACHE_IGNORE_PATTERNS reaches their system prompts."""

from __future__ import annotations

import base64
import hashlib
import json

import anthropic
import openai
import pytest

import screens
from fake_responses import responses_answer, responses_events
from fake_upstream import anthropic_message, anthropic_sse_reply, json_reply, message_stream_events, sse_reply
from images import is_image_reference

STATUS, MATCH, KEY = "X-Computer-Use-Cache", "X-Computer-Use-Cache-Match", "X-Computer-Use-Cache-Key"
NEAR = {"X-Cache-Match": "near"}
TASK = "Review the report and save it."
DATE_PATTERN = r"Today is \d{4}-\d{2}-\d{2}\."


def system_prompt(date: str = "2026-12-05") -> str:
    return f"You operate a desktop with the computer tool. Today is {date}. Be careful."


def shots(fmt: str = "PNG", **change) -> list[tuple[str, str]]:
    """The agent's last three screens as (media type, base64), drawn with ``change``."""
    return [screen(screens.desktop(step, **change), fmt) for step in range(3)]


def screen(image, fmt: str = "PNG") -> tuple[str, str]:
    return screens.MEDIA_TYPES[fmt], base64.b64encode(screens.encoded(image, fmt)).decode("ascii")


SHOTS = shots()
IDS = ["a1", "b2", "c3"]


def click(step: int) -> tuple[int, int]:
    action = screens.step_action(step)
    return action["x"], action["y"]


class MessagesAgent:
    """Claude's computer-use loop through ``client.beta.messages``: a screenshot action first, then
    one tool_result with the screenshot after each action."""

    name = "messages"
    path = "/messages"
    TOOLS = [{"type": "computer_20250124", "name": "computer", "display_width_px": 1024,
              "display_height_px": 768}]

    def __init__(self, proxy):
        self.client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-client", max_retries=0)

    def request(self, images, ids, *, system=None) -> dict:
        messages = [{"role": "user", "content": TASK}]
        for step, ((media_type, data), call_id) in enumerate(zip(images, ids)):
            x, y = click(step)
            action = {"action": "screenshot"} if step == 0 else {"action": "left_click", "coordinate": [x, y]}
            messages += [
                {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_{call_id}",
                                                   "name": "computer", "input": action}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_{call_id}", "content": [
                    {"type": "text", "text": f"Screenshot {step}."},
                    {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}]}]}]
        return {"model": "claude-test", "max_tokens": 512, "tools": self.TOOLS, "messages": messages,
                "system": system or system_prompt(), "betas": ["computer-use-2025-01-24"]}

    def create(self, images, ids, headers=None, **options):
        raw = self.client.beta.messages.with_raw_response.create(
            **self.request(images, ids, **options), extra_headers=headers or {})
        return raw.parse().model_dump(mode="json"), raw.headers

    def stream(self, images, ids, headers=None, **options):
        with self.client.beta.messages.stream(**self.request(images, ids, **options),
                                              extra_headers=headers or {}) as stream:
            return stream.get_final_message().model_dump(mode="json"), stream.response.headers

    def answer(self, call_id: str, step: int = 3) -> dict:
        x, y = click(step)
        return anthropic_message([{"type": "text", "text": "Clicking Save."},
                                  {"type": "tool_use", "id": f"toolu_{call_id}", "name": "computer",
                                   "input": {"action": "left_click", "coordinate": [x, y]}}],
                                 id=f"msg_{call_id}", model="claude-test")

    def reply(self, call_id: str, stream: bool = False):
        message = self.answer(call_id)
        return anthropic_sse_reply(message_stream_events(message)) if stream else json_reply(message)

    @staticmethod
    def tool_calls(answer: dict) -> list[tuple[str, dict]]:
        return [(block["id"], block["input"]) for block in answer["content"] if block["type"] == "tool_use"]


class ResponsesAgent:
    """OpenAI's computer-use loop through ``client.responses``, the history kept as input items:
    each computer_call the model made (its item id and call_id) and its computer_call_output."""

    name = "responses"
    path = "/responses"
    TOOLS = [{"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
              "environment": "linux"}]

    def __init__(self, proxy):
        self.client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test-client", max_retries=0)

    def request(self, images, ids, *, system=None) -> dict:
        items: list[dict] = [{"role": "user", "content": [{"type": "input_text", "text": TASK}]}]
        for step, ((media_type, data), call_id) in enumerate(zip(images, ids)):
            x, y = click(step)
            action = {"type": "screenshot"} if step == 0 else {"type": "click", "button": "left", "x": x, "y": y}
            items += [{"type": "computer_call", "id": f"cu_{call_id}", "call_id": f"call_{call_id}",
                       "action": action, "pending_safety_checks": [], "status": "completed"},
                      {"type": "computer_call_output", "call_id": f"call_{call_id}", "output": {
                          "type": "computer_screenshot", "image_url": f"data:{media_type};base64,{data}"}}]
        return {"model": "computer-use-preview", "tools": self.TOOLS, "input": items, "truncation": "auto",
                "instructions": system or system_prompt()}

    def create(self, images, ids, headers=None, **options):
        raw = self.client.responses.with_raw_response.create(
            **self.request(images, ids, **options), extra_headers=headers or {})
        return raw.parse().model_dump(mode="json"), raw.headers

    def stream(self, images, ids, headers=None, **options):
        with self.client.responses.stream(**self.request(images, ids, **options),
                                          extra_headers=headers or {}) as stream:
            return stream.get_final_response().model_dump(mode="json"), stream._response.headers

    def answer(self, call_id: str, step: int = 3) -> dict:
        x, y = click(step)
        return responses_answer({"model": "computer-use-preview", "tools": self.TOOLS}, 700, [
            {"type": "reasoning", "summary": ["The Save button is on the left."]},
            {"type": "computer_call", "id": f"cu_{call_id}", "call_id": f"call_{call_id}",
             "action": {"type": "click", "button": "left", "x": x, "y": y}}])

    def reply(self, call_id: str, stream: bool = False):
        answer = self.answer(call_id)
        return sse_reply(responses_events(answer), done=False) if stream else json_reply(answer)

    @staticmethod
    def tool_calls(answer: dict) -> list[tuple[str, dict]]:
        return [(item["call_id"], item["action"]) for item in answer["output"] if item["type"] == "computer_call"]


AGENTS = {"messages": MessagesAgent, "responses": ResponsesAgent}


@pytest.fixture(params=sorted(AGENTS))
def api(request):
    return request.param


def agent_on(api: str, proxy):
    return AGENTS[api](proxy)


def entry(http, proxy, key: str) -> dict:
    return http.get(proxy.url + f"/cache/entries/{key}", timeout=10).json()


def references(value) -> list[dict]:
    """Every image reference in a stored request, in document order."""
    if is_image_reference(value):
        return [value]
    if isinstance(value, dict):
        return [found for item in value.values() for found in references(item)]
    if isinstance(value, list):
        return [found for item in value for found in references(item)]
    return []


# -- at the defaults ----------------------------------------------------------------------------

def test_screenshots__three_screenshots_miss_then_hit_at_the_defaults(start_proxy, fake_upstream, api):
    proxy = start_proxy()
    agent = agent_on(api, proxy)
    assert len(json.dumps(agent.request(SHOTS, IDS))) > 300_000  # far past CACHE_MAX_INPUT_CHARS as text
    fake_upstream.enqueue(agent.reply("stored"))

    first, first_headers = agent.create(SHOTS, IDS)
    second, second_headers = agent.create(SHOTS, IDS)

    assert first_headers[STATUS] == "MISS", first_headers.get("X-Computer-Use-Cache-Bypass-Reason")
    assert (second_headers[STATUS], second_headers[MATCH]) == ("HIT", "exact")
    assert second == first and agent.tool_calls(second)[0][0].endswith("stored")
    assert len(fake_upstream.calls(agent.path)) == 1
    # The upstream got every screenshot as sent.
    sent = json.dumps(fake_upstream.calls(agent.path)[0].json)
    assert all(data in sent for _, data in SHOTS)


def test_screenshots__text_still_counts_against_the_limit(start_proxy, api):
    proxy = start_proxy(cache_max_input_chars=20_000)
    agent = agent_on(api, proxy)
    _, headers = agent.create(SHOTS, IDS, system="x" * 30_000)
    assert (headers[STATUS], headers["X-Computer-Use-Cache-Bypass-Reason"]) == (
        "BYPASS", "request is too large for cache")
    assert agent.create(SHOTS, IDS)[1][STATUS] == "MISS"


def test_screenshots__stored_entry_keeps_references_not_pixels(start_proxy, http, api):
    proxy = start_proxy()
    agent = agent_on(api, proxy)
    _, headers = agent.create(SHOTS, IDS)

    # (A Responses answer is also stored under its id, for GET /v1/responses/{id}.)
    [listed] = [row for row in http.get(proxy.url + "/cache/entries", timeout=10).json()["data"]
                if row["key"] == headers[KEY]]
    stored = entry(http, proxy, headers[KEY])
    text = json.dumps(stored["request"])

    assert listed["size"] < 20_000 and listed["mode"] == agent.name
    assert len(text) < 20_000
    assert references(stored["request"]) == [
        {"base64_sha256": hashlib.sha256(data.encode()).hexdigest(), "bytes": len(base64.b64decode(data)),
         "media_type": media_type} for media_type, data in SHOTS]
    assert SHOTS[0][1][:200] not in text and ";base64," not in text
    assert stored["request"]["cache_key"] == headers[KEY]


def test_exact_mode__never_decodes_a_screenshot(start_proxy, api, monkeypatch):
    import near_match
    decoded = []
    monkeypatch.setattr(near_match, "screen_print", lambda data: decoded.append(data))
    monkeypatch.setattr(near_match, "decoded_image", lambda payload: decoded.append(payload))
    proxy = start_proxy()
    agent = agent_on(api, proxy)
    statuses = [agent.create(SHOTS, IDS)[1][STATUS], agent.create(SHOTS, IDS)[1][STATUS],
                agent.create(shots(clock="10:47"), IDS)[1][STATUS], agent.stream(SHOTS, IDS)[1][STATUS]]
    assert statuses == ["MISS", "HIT", "MISS", "HIT"]
    assert decoded == []


# -- near matching ------------------------------------------------------------------------------

def test_near__clock_change_hits_in_near_mode_and_misses_in_exact_mode(start_proxy, fake_upstream, api):
    proxy = start_proxy()  # server mode exact: near asked per request
    agent = agent_on(api, proxy)
    fake_upstream.enqueue(agent.reply("stored"))
    stored, stored_headers = agent.create(SHOTS, IDS, NEAR)
    _, exact_headers = agent.create(shots(clock="10:48"), IDS)
    upstream_calls = len(fake_upstream.calls(agent.path))
    again, headers = agent.create(shots(clock="10:58"), IDS, NEAR)

    assert stored_headers[STATUS] == "MISS" and exact_headers[STATUS] == "MISS"
    assert (headers[STATUS], headers[MATCH]) == ("HIT", "near")
    assert headers[KEY] == stored_headers[KEY]
    assert again == stored
    assert len(fake_upstream.calls(agent.path)) == upstream_calls
    assert all("x-cache-match" not in {name.lower() for name in call.headers}
               for call in fake_upstream.calls(agent.path))


@pytest.mark.parametrize("change", ["highlight", "dialog"])
def test_near__a_change_of_one_percent_or_more_misses(start_proxy, api, change):
    changed_screen = screens.desktop(2, **{change: True})
    assert screens.changed_fraction(screens.desktop(2), changed_screen) >= 0.01
    proxy = start_proxy(cache_match="near")
    agent = agent_on(api, proxy)
    agent.create(SHOTS, IDS)
    _, headers = agent.create(SHOTS[:2] + [screen(changed_screen)], IDS)
    assert headers[STATUS] == "MISS"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_near__re_encoded_screenshots_hit(start_proxy, fake_upstream, api, fmt):
    proxy = start_proxy(cache_match="near")
    agent = agent_on(api, proxy)
    stored, stored_headers = agent.create(SHOTS, IDS)
    re_encoded = shots(fmt)
    assert {media_type for media_type, _ in re_encoded} == {screens.MEDIA_TYPES[fmt]}
    again, headers = agent.create(re_encoded, IDS)
    assert (headers[STATUS], headers[MATCH]) == ("HIT", "near")
    assert headers[KEY] == stored_headers[KEY] and again == stored
    assert len(fake_upstream.calls(agent.path)) == 1


def test_near__different_tool_call_ids_hit(start_proxy, fake_upstream, api):
    proxy = start_proxy(cache_match="near")
    agent = agent_on(api, proxy)
    fake_upstream.enqueue(agent.reply("stored"))
    stored, _ = agent.create(SHOTS, IDS)
    again, headers = agent.create(SHOTS, ["x7", "y8", "z9"])
    assert (headers[STATUS], headers[MATCH]) == ("HIT", "near")
    assert again == stored
    # Ids are renumbered by first appearance: a history whose calls pair up otherwise is another request.
    _, headers = agent.create(SHOTS, ["a1", "b2", "a1"])
    assert headers[STATUS] == "MISS"


def test_near__streamed_near_hit_replays_the_stored_tool_call(start_proxy, fake_upstream, api):
    proxy = start_proxy(cache_match="near")
    agent = agent_on(api, proxy)
    fake_upstream.enqueue(agent.reply("from_run_1", stream=True))

    first, first_headers = agent.stream(SHOTS, IDS)
    upstream_calls = len(fake_upstream.calls(agent.path))
    again, headers = agent.stream(shots(clock="10:59"), ["n1", "n2", "n3"])

    assert first_headers[STATUS] == "MISS"
    assert (headers[STATUS], headers[MATCH]) == ("HIT", "near")
    assert again == first
    [(call_id, action)] = agent.tool_calls(again)
    assert call_id.endswith("from_run_1") and str(click(3)[0]) in json.dumps(action)
    assert len(fake_upstream.calls(agent.path)) == upstream_calls
    # The same answer, asked for as JSON, is the stored one too.
    as_json, json_headers = agent.create(shots(clock="11:00"), ["j1", "j2", "j3"])
    assert json_headers[MATCH] == "near" and as_json == first


def test_near__never_crosses_namespaces_or_sizes(start_proxy, api):
    proxy = start_proxy(cache_match="near")
    agent = agent_on(api, proxy)
    agent.create(SHOTS, IDS)
    ticked = shots(clock="10:47")
    small = [screen(screens.desktop(step, size=(1024, 760))) for step in range(3)]
    assert agent.create(ticked, IDS, {"X-Cache-Namespace": "run-2"})[1][STATUS] == "MISS"
    assert agent.create(small, IDS)[1][STATUS] == "MISS"
    assert agent.create(ticked, IDS)[1][MATCH] == "near"


# -- volatile text ------------------------------------------------------------------------------

def test_ignore_patterns__cover_the_system_prompt_and_instructions(start_proxy, fake_upstream, http, api):
    proxy = start_proxy(cache_ignore_patterns=(DATE_PATTERN,))
    agent = agent_on(api, proxy)
    first, first_headers = agent.create(SHOTS, IDS, system=system_prompt("2026-12-04"))
    again, headers = agent.create(SHOTS, IDS, system=system_prompt("2026-12-05"))
    other, other_headers = agent.create(SHOTS, IDS, system=system_prompt("2026-12-05") + " Be quick.")

    assert (first_headers[STATUS], headers[STATUS], other_headers[STATUS]) == ("MISS", "HIT", "MISS")
    assert headers[KEY] == first_headers[KEY] and again == first
    sent = fake_upstream.calls(agent.path)[0].json
    assert "Today is 2026-12-04." in json.dumps(sent)  # the upstream gets the client's own text
    stored = json.dumps(entry(http, proxy, first_headers[KEY])["request"])
    assert "<cache-ignored>" in stored and "2026-12-04" not in stored


def test_ignore_patterns__anthropic_system_blocks_and_near_mode_together(start_proxy, fake_upstream):
    """Claude Code and the computer-use demos send ``system`` as text blocks; the next day's re-run
    has another date and another clock: one near hit."""
    proxy = start_proxy(cache_match="near", cache_ignore_patterns=(DATE_PATTERN,))
    agent = MessagesAgent(proxy)

    def blocks(date: str) -> list[dict]:
        return [{"type": "text", "text": system_prompt(date), "cache_control": {"type": "ephemeral"}}]

    stored, _ = agent.create(SHOTS, IDS, system=blocks("2026-12-04"))
    again, headers = agent.create(shots(clock="09:02"), ["d1", "d2", "d3"], system=blocks("2026-12-05"))
    assert (headers[STATUS], headers[MATCH]) == ("HIT", "near") and again == stored
    assert len(fake_upstream.calls("/messages")) == 1


def test_near__a_responses_run_chained_by_previous_response_id_replays(start_proxy, fake_upstream):
    """OpenAI's loop chained by ids: step 1 (text only) hits exactly and hands out the stored
    response id, so step 2 (a screenshot whose clock moved) chains on it and hits near."""
    proxy = start_proxy(cache_match="near")
    agent = ResponsesAgent(proxy)
    fake_upstream.enqueue(json_reply(agent.answer("first")), json_reply(agent.answer("second")))

    def run(clock: str) -> tuple[list[str], list[dict]]:
        first = agent.client.responses.with_raw_response.create(
            model="computer-use-preview", tools=agent.TOOLS, input=TASK, truncation="auto")
        response = first.parse()
        [call] = [item for item in response.output if item.type == "computer_call"]
        media_type, data = screen(screens.desktop(0, clock=clock))
        second = agent.client.responses.with_raw_response.create(
            model="computer-use-preview", tools=agent.TOOLS, truncation="auto", previous_response_id=response.id,
            input=[{"type": "computer_call_output", "call_id": call.call_id, "output": {
                "type": "computer_screenshot", "image_url": f"data:{media_type};base64,{data}"}}])
        return ([f"{first.headers[STATUS]}/{first.headers.get(MATCH, '-')}",
                 f"{second.headers[STATUS]}/{second.headers.get(MATCH, '-')}"],
                [response.model_dump(mode="json"), second.parse().model_dump(mode="json")])

    statuses_1, answers_1 = run("10:41")
    statuses_2, answers_2 = run("10:52")
    assert statuses_1 == ["MISS/-", "MISS/-"]
    assert statuses_2 == ["HIT/exact", "HIT/near"]
    assert answers_2 == answers_1
    assert len(fake_upstream.calls("/responses")) == 2
