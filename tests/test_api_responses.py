"""OpenAI Responses end to end: the official openai SDK against a real proxy and the fake upstream's
Responses half (tests/fake_responses.py), JSON and streamed."""

from __future__ import annotations

import openai
import pytest

from fake_responses import (error_payloads, failed_payloads, frame, incomplete_payloads, responses_answer,
                            responses_events, truncated_payloads)
from fake_upstream import json_reply, sse_reply, truncated_sse_reply

MODEL = "computer-use-preview"
STATUS = "X-Computer-Use-Cache"
REQUEST = {"model": MODEL, "input": "Open the settings page.", "truncation": "auto",
           "tools": [{"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
                      "environment": "browser"}]}
SCRIPTS = {
    "text": [{"type": "message", "text": "Opening the settings page."}],
    "function_call": [{"type": "function_call", "name": "open_url", "arguments": {"url": "about:settings"}}],
    "computer_call": [{"type": "reasoning", "summary": ["The gear icon is top right."], "encrypted_content": "gAAAAB"},
                      {"type": "computer_call", "action": {"type": "click", "button": "left", "x": 156, "y": 50},
                       "pending_safety_checks": []}],
}


def answer(name: str, call_number: int = 900) -> dict:
    return responses_answer(REQUEST, call_number, SCRIPTS[name])


def create(client, **overrides):
    raw = client.responses.with_raw_response.create(**{**REQUEST, **overrides})
    return raw.parse(), raw.headers


def stream_final(client, **overrides):
    with client.responses.stream(**{**REQUEST, **overrides}) as stream:
        return stream.get_final_response(), stream._response.headers


def dump(response) -> dict:
    return response.model_dump(mode="json", exclude_none=True)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_responses__miss_then_hit_returns_the_same_response(openai_client, fake_upstream, name):
    fake_upstream.enqueue(json_reply(answer(name)))
    first, first_headers = create(openai_client)
    second, second_headers = create(openai_client)
    assert (first_headers[STATUS], second_headers[STATUS]) == ("MISS", "HIT")
    assert dump(second) == dump(first)
    assert first.model_dump(mode="json", exclude_unset=True)["output"] == answer(name)["output"]
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0
    assert len(fake_upstream.calls("/responses")) == 1


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_responses__stream_hit_rebuilds_the_stored_response_in_the_sdk(openai_client, fake_upstream, name):
    fake_upstream.enqueue(json_reply(answer(name)))
    stored, _ = create(openai_client)
    final, headers = stream_final(openai_client)
    assert headers[STATUS] == "HIT"
    assert dump(final) == dump(stored)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_responses__streamed_miss_is_stored_and_an_immediate_repeat_hits(openai_client, fake_upstream, name):
    fake_upstream.enqueue(sse_reply(responses_events(answer(name)), done=False))
    live, live_headers = stream_final(openai_client)
    replayed, replay_headers = stream_final(openai_client)
    as_json, json_headers = create(openai_client)
    assert (live_headers[STATUS], replay_headers[STATUS], json_headers[STATUS]) == ("MISS", "HIT", "HIT")
    assert dump(replayed) == dump(live) == dump(as_json)
    assert len(fake_upstream.calls("/responses")) == 1


# The SDK has no final response without response.completed (RuntimeError), and raises an error event.
@pytest.mark.parametrize("payloads, raised", [(failed_payloads, RuntimeError), (incomplete_payloads, RuntimeError),
                                              (error_payloads, openai.APIError)])
def test_responses__unsuccessful_streams_are_relayed_and_not_stored(openai_client, fake_upstream, payloads, raised):
    fake_upstream.enqueue(sse_reply([frame(p) for p in payloads(answer("text"))], done=False))
    with pytest.raises(raised):
        stream_final(openai_client)
    _, headers = create(openai_client)
    assert headers[STATUS] == "MISS"


def test_responses__interrupted_stream_is_not_stored(openai_client, fake_upstream):
    fake_upstream.enqueue(truncated_sse_reply([frame(p) for p in truncated_payloads(answer("computer_call"))]))
    with pytest.raises(openai.APIError):
        stream_final(openai_client)
    _, headers = create(openai_client)
    assert headers[STATUS] == "MISS"
    assert len(fake_upstream.calls("/responses")) == 2


def test_responses__background_requests_are_forwarded_and_never_cached(openai_client, fake_upstream):
    first, headers = create(openai_client, background=True)
    again, again_headers = create(openai_client, background=True)
    assert (headers[STATUS], again_headers[STATUS]) == ("BYPASS", "BYPASS")
    assert headers["X-Computer-Use-Cache-Bypass-Reason"] == "background responses are not cached"
    assert first.id != again.id
    assert len(fake_upstream.calls("/responses")) == 2


def test_responses__previous_response_id_and_reasoning_are_keyed(openai_client, fake_upstream):
    first, _ = create(openai_client)
    _, chained = create(openai_client, previous_response_id=first.id)
    _, chained_again = create(openai_client, previous_response_id=first.id)
    _, other_effort = create(openai_client, previous_response_id=first.id, reasoning={"effort": "high"})
    assert [chained[STATUS], chained_again[STATUS], other_effort[STATUS]] == ["MISS", "HIT", "MISS"]


def test_responses__retrieve_by_id_answers_a_stored_response_from_the_store(openai_client, fake_upstream):
    fake_upstream.enqueue(json_reply(answer("computer_call")))
    created, _ = create(openai_client)
    raw = openai_client.responses.with_raw_response.retrieve(created.id)
    assert raw.headers[STATUS] == "HIT"
    assert dump(raw.parse()) == dump(created)
    assert [call.method for call in fake_upstream.requests] == ["POST"]


def test_responses__retrieve_stays_within_the_callers_partition(start_proxy, fake_upstream):
    proxy = start_proxy(upstream_api_key="")
    owner = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-owner", max_retries=0)
    other = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-other", max_retries=0)
    created, _ = create(owner)
    assert owner.responses.with_raw_response.retrieve(created.id).headers[STATUS] == "HIT"
    forwarded = other.responses.with_raw_response.retrieve(created.id)
    assert forwarded.headers[STATUS] == "BYPASS"  # the upstream's answer, not ours
    assert fake_upstream.requests[-1].method == "GET"
    assert fake_upstream.requests[-1].headers["authorization"] == "Bearer sk-other"


def test_responses__retrieve_of_an_unknown_id_is_forwarded(openai_client, fake_upstream):
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve("resp_unknown")
    assert fake_upstream.requests[-1].path == "/v1/responses/resp_unknown"


def test_responses__a_streamed_miss_can_be_retrieved_by_id(openai_client, fake_upstream):
    fake_upstream.enqueue(sse_reply(responses_events(answer("text")), done=False))
    live, _ = stream_final(openai_client)
    raw = openai_client.responses.with_raw_response.retrieve(live.id)
    assert raw.headers[STATUS] == "HIT" and dump(raw.parse()) == dump(live)


def test_responses__proxy_made_errors_are_openai_errors(openai_client, fake_upstream):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.responses.create(model=MODEL, input=[1, 2])
    assert caught.value.body["param"] == "input[0]"
    assert fake_upstream.calls("/responses") == []


def test_responses__a_computer_use_loop_chained_by_ids_replays_from_the_cache(openai_client, fake_upstream):
    """OpenAI's computer-use loop: a computer_call, then its computer_call_output (a PNG screenshot)
    chained with previous_response_id. Run again, every step is a HIT: the ids the cache handed out
    are the ones the second run chains on."""
    from test_responses_wire import png_data_url

    screenshot = png_data_url(64, 48, (32, 64, 128))

    def run() -> tuple[list[str], list[dict]]:
        statuses, answers = [], []
        first, headers = create(openai_client)
        statuses.append(headers[STATUS])
        answers.append(dump(first))
        call = next(item for item in first.output if item.type == "computer_call")
        output = [{"type": "computer_call_output", "call_id": call.call_id,
                   "output": {"type": "computer_screenshot", "image_url": screenshot}}]
        second, headers = create(openai_client, previous_response_id=first.id, input=output)
        statuses.append(headers[STATUS])
        answers.append(dump(second))
        return statuses, answers

    fake_upstream.enqueue(json_reply(answer("computer_call", 901)),
                          json_reply(responses_answer(REQUEST, 902, SCRIPTS["text"])))
    first_statuses, first_answers = run()
    second_statuses, second_answers = run()
    assert (first_statuses, second_statuses) == (["MISS", "MISS"], ["HIT", "HIT"])
    assert second_answers == first_answers
    assert len(fake_upstream.calls("/responses")) == 2


def test_responses__retrieve_stays_within_the_namespace(openai_client, fake_upstream):
    created, _ = create(openai_client, extra_headers={"X-Cache-Namespace": "run-1"})
    inside = openai_client.responses.with_raw_response.retrieve(created.id, extra_headers={"X-Cache-Namespace": "run-1"})
    outside = openai_client.responses.with_raw_response.retrieve(created.id)
    assert (inside.headers[STATUS], outside.headers[STATUS]) == ("HIT", "BYPASS")


def test_responses__an_items_other_routes_are_forwarded(openai_client, fake_upstream):
    fake_upstream.enqueue(json_reply({"id": "resp_1", "object": "response", "status": "cancelled"}))
    cancelled = openai_client.responses.with_raw_response.cancel("resp_1")
    assert cancelled.headers[STATUS] == "BYPASS" and cancelled.parse().status == "cancelled"
    with pytest.raises(openai.NotFoundError):  # the fake answered no resp_1: its 404 comes back
        openai_client.responses.delete("resp_1")
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.input_items.list("resp_1")
    assert [(call.method, call.path) for call in fake_upstream.requests] == [
        ("POST", "/v1/responses/resp_1/cancel"), ("DELETE", "/v1/responses/resp_1"),
        ("GET", "/v1/responses/resp_1/input_items")]
