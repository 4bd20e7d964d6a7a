"""A stored completion replayed as a stream is accumulated by the official SDK into exactly that completion.

Each case is stored by a non-streamed miss (the fake upstream answers with exactly that JSON), then
asked for again with ``stream=True``: every answer below is a HIT made by ``streaming.replay``.
"""

from __future__ import annotations

import json

import openai
import pytest
from fake_upstream import BASE_CREATED, chat_completion, json_reply
from helpers import chat_body, completion_body
from streaming_checks import (accumulate_chat_chunks, assert_matches, check_chat_wire_rules,
                              check_text_wire_rules, read_sse)

USAGE = {"prompt_tokens": 41, "completion_tokens": 17, "total_tokens": 58,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def _choice(index: int, message: dict, finish_reason: str = "stop", **extra) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": None, "refusal": None, **message},
            "logprobs": None, "finish_reason": finish_reason, **extra}


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


EMOJI_TEXT = ("Family 👩‍👩‍👧‍👦, flags 🇺🇸🇯🇵, skin tones 👋🏽, astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟘𝟙𝟚 🀄, CJK 漢字かな, "
              "RTL עברית العربية, combining é vs é, NUL-free \u2028 line separator, quotes \"'\\ done.")

STORED_CHATS = {
    "plain": chat_completion("The button is at the top right of the window; click it once."),
    "multi_choice": chat_completion(
        None, id="chatcmpl-multi", usage=USAGE,
        choices=[_choice(0, {"content": "First: open the settings menu and pick Display."}),
                 _choice(1, {"content": "Second: right-click the desktop instead."}, "stop"),
                 _choice(2, {"content": None, "tool_calls": [_tool_call("call_m2", "click", '{"x":1,"y":2}')]},
                         "tool_calls")]),
    "refusal": chat_completion(
        None, id="chatcmpl-refuse",
        choices=[_choice(0, {"content": None, "refusal": "I can't help with entering that password."})]),
    "parallel_tool_calls": chat_completion(
        None, id="chatcmpl-tools",
        tool_calls=[_tool_call("call_a1", "click", '{"x": 156, "y": 50, "button": "left"}'),
                    _tool_call("call_b2", "type_text", '{"text": "hello world, this is a longer argument"}'),
                    _tool_call("call_c3", "screenshot", "{}")]),
    "tool_call_empty_arguments": chat_completion(
        None, id="chatcmpl-empty-args", tool_calls=[_tool_call("call_e1", "take_screenshot", "")]),
    "content_and_tool_call": chat_completion(
        "Let me click the OK button for you now.", id="chatcmpl-both",
        tool_calls=[_tool_call("call_ok", "click", '{"target":"OK"}')]),
    "legacy_function_call": chat_completion(
        None, id="chatcmpl-fn",
        choices=[_choice(0, {"content": None,
                             "function_call": {"name": "get_weather", "arguments": '{"city":"Zürich"}'}},
                         "function_call")]),
    "unicode_emoji": chat_completion(EMOJI_TEXT, id="chatcmpl-emoji"),
    "long_content": chat_completion(("0123456789abcdef" * 4 + "\n") * 780, id="chatcmpl-long"),
    "empty_content": chat_completion("", id="chatcmpl-empty"),
    "with_usage_and_extras": chat_completion(
        "Done.", id="chatcmpl-usage", usage=USAGE, service_tier="default",
        system_fingerprint="fp_44709d6fcb"),
    "logprobs": chat_completion(
        None, id="chatcmpl-logprobs",
        choices=[{"index": 0, "message": {"role": "assistant", "content": "Yes sir", "refusal": None,
                                          "annotations": []},
                  "logprobs": {"content": [
                      {"token": "Yes", "logprob": -0.01, "bytes": [89, 101, 115],
                       "top_logprobs": [{"token": "Yes", "logprob": -0.01, "bytes": [89, 101, 115]}]},
                      {"token": " sir", "logprob": -1.5, "bytes": [32, 115, 105, 114], "top_logprobs": []}],
                      "refusal": None},
                  "finish_reason": "stop"}]),
    "openrouter_extras": {
        "id": "gen-1700000000-abcDEF", "provider": "Anthropic", "model": "anthropic/claude-sonnet-4",
        "object": "chat.completion", "created": BASE_CREATED,
        "choices": [{"logprobs": None, "finish_reason": "tool_calls", "native_finish_reason": "tool_use",
                     "index": 0,
                     "message": {"role": "assistant", "content": "I'll take a screenshot first.",
                                 "refusal": None, "reasoning": "The user wants the desktop; look first.",
                                 "reasoning_details": [{"type": "reasoning.text",
                                                        "text": "The user wants the desktop; look first.",
                                                        "signature": "EqoBCkgIBxABGAIiQ", "format":
                                                        "anthropic-claude-v1", "index": 0}],
                                 "tool_calls": [{"id": "toolu_01A", "index": 0, "type": "function",
                                                 "function": {"name": "computer",
                                                              "arguments": '{"action":"screenshot"}'}}]}}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280, "cost": 0.0048,
                  "is_byok": False, "prompt_tokens_details": {"cached_tokens": 1024},
                  "cost_details": {"upstream_inference_cost": None},
                  "completion_tokens_details": {"reasoning_tokens": 12}},
    },
}


def _store_by_non_streamed_miss(client: openai.OpenAI, fake_upstream, stored: dict, body: dict, path="chat"):
    fake_upstream.enqueue(json_reply(stored))
    if path == "chat":
        raw = client.chat.completions.with_raw_response.create(**body)
    else:
        raw = client.completions.with_raw_response.create(**body)
    assert raw.headers["X-Computer-Use-Cache"] == "MISS"
    assert raw.headers.get("X-Computer-Use-Cache-Store", "").startswith("stored")


def _request(name: str, stored: dict) -> dict:
    body = chat_body(f"Replay case {name}", model=stored["model"])
    if len(stored["choices"]) > 1:
        body["n"] = len(stored["choices"])
    return body


@pytest.mark.parametrize("name", sorted(STORED_CHATS))
def test_replay__sdk_accumulates_the_stored_chat_completion(name, proxy, openai_client, fake_upstream, http):
    stored = json.loads(json.dumps(STORED_CHATS[name]))
    body = _request(name, stored)
    _store_by_non_streamed_miss(openai_client, fake_upstream, stored, body)

    # The SDK's own accumulator, with usage.
    with openai_client.chat.completions.stream(**body, stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert_matches(stored, final.model_dump())

    # Chunk by chunk from create(stream=True), folded by hand, without usage.
    raw = openai_client.chat.completions.with_raw_response.create(**body, stream=True)
    assert raw.headers["X-Computer-Use-Cache"] == "HIT"
    chunks = [chunk.to_dict() for chunk in raw.parse()]
    manual = accumulate_chat_chunks(chunks)
    assert "usage" not in manual
    assert_matches({k: v for k, v in stored.items() if k != "usage"}, manual)

    # The raw wire, both ways.
    for include_usage in (False, True):
        request = {**body, "stream": True}
        if include_usage:
            request["stream_options"] = {"include_usage": True}
        response = http.post(proxy.url + "/v1/chat/completions", json=request)
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Computer-Use-Cache"] == "HIT"
        chunks = check_chat_wire_rules(read_sse(response), stored, include_usage)
        assert len(chunks) <= 12 * len(stored["choices"]) + 4 * sum(
            len(c["message"].get("tool_calls") or []) for c in stored["choices"]), "a handful of chunks"
    assert len(fake_upstream.calls()) == 1, "every streamed answer was a hit"


def test_replay__finish_reason_length_survives_chunk_by_chunk(openai_client, fake_upstream):
    """The SDK's get_final_completion() raises on "length" by design; chunk folding must still see it."""
    stored = chat_completion("This answer was cut off becau", id="chatcmpl-len", finish_reason="length")
    body = chat_body("Replay a cut-off answer")
    _store_by_non_streamed_miss(openai_client, fake_upstream, stored, body)
    chunks = [chunk.to_dict() for chunk in openai_client.chat.completions.create(**body, stream=True)]
    assert_matches({k: v for k, v in stored.items() if k != "usage"}, accumulate_chat_chunks(chunks))


def test_replay__never_repeats_role_id_or_name(openai_client, fake_upstream):
    """The SDK concatenates strings: a repeated role/id/name would come back as "assistantassistant"."""
    stored = STORED_CHATS["multi_choice"]
    body = _request("multi_choice", stored)
    _store_by_non_streamed_miss(openai_client, fake_upstream, stored, body)
    with openai_client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    assert [choice.index for choice in final.choices] == [0, 1, 2]
    assert {choice.message.role for choice in final.choices} == {"assistant"}
    call = final.choices[2].message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("call_m2", "function", "click")


STORED_TEXT_COMPLETIONS = {
    "single": {"id": "cmpl-one", "object": "text_completion", "created": BASE_CREATED,
               "model": "test/model-a", "system_fingerprint": "fp_legacy",
               "choices": [{"text": " a legacy answer with émoji 🧪 and more words to split", "index": 0,
                            "logprobs": None, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}},
    "multi": {"id": "cmpl-multi", "object": "text_completion", "created": BASE_CREATED,
              "model": "test/model-a",
              "choices": [{"text": "zero " * 30, "index": 0, "logprobs": None, "finish_reason": "length"},
                          {"text": "", "index": 1, "logprobs": None, "finish_reason": "stop"},
                          {"text": "two", "index": 2,
                           "logprobs": {"tokens": ["two"], "token_logprobs": [-0.2], "top_logprobs": None,
                                        "text_offset": [0]},
                           "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43}},
}


@pytest.mark.parametrize("name", sorted(STORED_TEXT_COMPLETIONS))
def test_replay__legacy_completion_texts_join_to_the_stored_text(name, proxy, openai_client, fake_upstream, http):
    stored = STORED_TEXT_COMPLETIONS[name]
    body = completion_body(f"Legacy replay {name}")
    if len(stored["choices"]) > 1:
        body["n"] = len(stored["choices"])
    _store_by_non_streamed_miss(openai_client, fake_upstream, stored, body, path="completion")

    for include_usage in (False, True):
        extra = {"stream_options": {"include_usage": True}} if include_usage else {}
        raw = openai_client.completions.with_raw_response.create(**body, stream=True, **extra)
        assert raw.headers["X-Computer-Use-Cache"] == "HIT"
        chunks = list(raw.parse())
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        logprobs: dict[int, dict] = {}
        for chunk in chunks:
            assert (chunk.id, chunk.created, chunk.model, chunk.object) == (
                stored["id"], stored["created"], stored["model"], "text_completion")
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finish[choice.index] = choice.finish_reason
                if choice.logprobs is not None:
                    logprobs[choice.index] = choice.logprobs.model_dump(exclude_unset=True)
        for choice in stored["choices"]:
            assert texts[choice["index"]] == choice["text"]
            assert finish[choice["index"]] == choice["finish_reason"]
            assert logprobs.get(choice["index"]) == choice["logprobs"]
        usage = chunks[-1].usage.model_dump(exclude_unset=True) if include_usage else None
        assert usage == (stored["usage"] if include_usage else None)

        request = {**body, "stream": True, **extra}
        response = http.post(proxy.url + "/v1/completions", json=request)
        check_text_wire_rules(read_sse(response), stored, include_usage)
    assert len(fake_upstream.calls("/completions")) == 1
