"""The Responses wire (apis/responses_wire.py) against the official openai SDK and the fake upstream.

Replay and assembly are inverses, so they are tested as round trips: a stored response replayed
as events and read by the SDK's own stream accumulator (over a real local HTTP socket) comes back
equal to the stored one; the fake upstream's event streams, cut into chunks anywhere, assemble
into the fake's response; a stream that failed, ran out, erred or broke off is never storable.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from apis.responses_wire import (
    ResponsesStreamAssembler,
    UsageFigures,
    bypass_reason,
    inline_images,
    replay_response,
    storable_reason,
    tool_call_ids,
    usage_figures,
    validate_responses,
)
from errors import InvalidRequest
from fake_responses import (
    error_payloads,
    failed_payloads,
    frame,
    incomplete_payloads,
    responses_answer,
    responses_event_payloads,
    responses_events,
    truncated_payloads,
)



def png_data_url(width: int, height: int, rgb: tuple[int, int, int]) -> str:
    """A real one-colour PNG as a data: URL (Pillow is not a dependency of this branch)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


PNG = png_data_url(4, 3, (255, 0, 0))
SCREENSHOT = png_data_url(64, 48, (32, 64, 128))
LONG_TEXT = "The login button is at the top right of the page; I will click it and then wait for the form. " * 3
CLICK = {"type": "click", "button": "left", "x": 156, "y": 50}
SAFETY_CHECK = {"id": "cu_sc_67cb", "code": "malicious_instructions", "message": "Check the page first."}

SCRIPTS = {
    "text": None,
    "long_text": [{"type": "message", "text": LONG_TEXT}],
    "function_call": [{"type": "function_call", "name": "get_weather",
                       "arguments": {"location": "Paris, France", "unit": "celsius"}}],
    "computer_call": [{"type": "computer_call", "action": CLICK, "pending_safety_checks": [SAFETY_CHECK]}],
    "reasoning": [{"type": "reasoning", "summary": ["First I look at the screenshot.", "Then I decide."],
                   "encrypted_content": "gAAAAABoQ2x4ZW5jcnlwdGVk"},
                  {"type": "message", "text": "Done thinking."}],
    "multiple_items": [
        {"type": "reasoning", "summary": ["Plan: search, then click."]},
        {"type": "message", "text": "Let me look."},
        {"type": "function_call", "name": "search", "arguments": '{"query": "weather in Paris"}'},
        {"type": "function_call", "name": "lookup", "arguments": {"id": 7}},
        {"type": "computer_call", "action": {"type": "type", "text": "hello"}},
        {"type": "computer_call", "action": {"type": "screenshot"}},
    ],
    "refusal": [{"type": "message",
                 "content": [{"type": "refusal", "refusal": "I can't help with that request."}]}],
}


def make_response(script: str = "text", call_number: int = 1) -> dict:
    request = {"model": "computer-use-preview", "input": "Open the login page and sign in, please.",
               "tools": [{"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
                          "environment": "browser"}]}
    return responses_answer(request, call_number, scripted=copy.deepcopy(SCRIPTS[script]))


def extra_rich_response() -> dict:
    """A stored answer with everything a replay must carry untouched: annotations, logprobs,
    reasoning text, built-in tool calls, provider fields, cached tokens and a cost."""
    response = make_response("text")
    text = "See the docs [1] for more."
    response["output"] = [
        {"id": "ws_1", "type": "web_search_call", "status": "completed",
         "action": {"type": "search", "query": "openai docs"}},
        {"id": "rs_9", "type": "reasoning", "summary": [],
         "content": [{"type": "reasoning_text", "text": "Reading the results carefully."}]},
        {"id": "msg_9", "type": "message", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": text,
                      "annotations": [{"type": "url_citation", "start_index": 14, "end_index": 17,
                                       "url": "https://example.com/docs", "title": "Docs"}],
                      "logprobs": [{"token": "See", "logprob": -0.1, "bytes": [83, 101, 101],
                                    "top_logprobs": []}]}]},
        {"id": "ctc_1", "type": "custom_tool_call", "status": "completed", "call_id": "call_c1",
         "name": "apply_patch", "input": "*** Begin Patch\n*** End Patch"},
    ]
    response["usage"]["input_tokens_details"]["cached_tokens"] = 5
    response["usage"]["cost"] = 0.00042
    response["provider"] = "OpenAI"
    return response


# --------------------------------------------------------------------------- a tiny upstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = self.server.body
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        # Odd-sized chunks, so events straddle reads as they do on a real network.
        for start in range(0, len(body), 997):
            piece = body[start:start + 997]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def sse_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.body = b""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def sdk(sse_server):
    """An official client whose every Responses call gets ``serve(body)``'s bytes as its stream."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sse_server.server_address[1]}/v1",
                           api_key="sk-test", max_retries=0, timeout=10)

    def serve(body: bytes) -> openai.OpenAI:
        sse_server.body = body
        return client

    yield serve
    client.close()


def without_sdk_parsing(value):
    """The SDK's parsed view adds ``parsed`` (text parts) and ``parsed_arguments`` (function
    calls); everything else must equal the stored response."""
    if isinstance(value, dict):
        return {k: without_sdk_parsing(v) for k, v in value.items() if k not in ("parsed", "parsed_arguments")}
    if isinstance(value, list):
        return [without_sdk_parsing(item) for item in value]
    return value


def final_response_via_sdk(serve, body: bytes) -> tuple[dict, list]:
    with serve(body).responses.stream(model="computer-use-preview", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    return without_sdk_parsing(final.to_dict()), events


# --------------------------------------------------------------------------- replay


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_replay_response__sdk_stream_accumulator_rebuilds_stored(sdk, script):
    stored = make_response(script)
    final, _ = final_response_via_sdk(sdk, b"".join(replay_response(stored)))
    assert final == stored
    assert final["usage"] == stored["usage"]


def test_replay_response__sdk_rebuilds_annotations_logprobs_reasoning_text_and_tool_calls(sdk):
    stored = extra_rich_response()
    final, events = final_response_via_sdk(sdk, b"".join(replay_response(stored)))
    assert final == stored
    types = [event.type for event in events]
    assert types.count("response.output_text.annotation.added") == 1
    assert ["response.web_search_call.in_progress", "response.web_search_call.searching",
            "response.web_search_call.completed"] == [kind for kind in types
                                                      if kind.startswith("response.web_search_call.")]
    assert "response.reasoning_text.delta" in types and "response.custom_tool_call_input.done" in types
    text_part = next(event.part for event in events if event.type == "response.content_part.added"
                     and event.part.type == "output_text")
    assert (text_part.text, text_part.annotations, text_part.logprobs) == ("", [], [])
    first_delta = next(event for event in events if event.type == "response.output_text.delta")
    assert [logprob.token for logprob in first_delta.logprobs] == ["See"]


def test_replay_response__raw_events_are_numbered_from_zero_and_end_with_the_stored_response(sdk):
    stored = make_response("multiple_items")
    events = list(sdk(b"".join(replay_response(stored))).responses.create(
        model="computer-use-preview", input="hi", stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [event.type for event in events[:2]] == ["response.created", "response.in_progress"]
    for opening in events[:2]:
        assert opening.response.id == stored["id"]
        assert opening.response.status == "in_progress"
        assert opening.response.output == [] and opening.response.usage is None
    assert events[-1].type == "response.completed"
    assert events[-1].response.to_dict() == stored  # unchanged: same id, output, usage
    added = [event for event in events if event.type == "response.output_item.added"]
    done = [event for event in events if event.type == "response.output_item.done"]
    assert [event.output_index for event in added] == [event.output_index for event in done] == list(range(6))
    assert all(event.item.status == "in_progress" for event in added if hasattr(event.item, "status")
               and event.item.type != "reasoning")
    assert [event.item.to_dict() for event in done] == stored["output"]


def test_replay_response__deltas_rebuild_text_and_arguments_in_pieces(sdk):
    stored = make_response("long_text")
    stored["output"] += make_response("function_call")["output"]
    _, events = final_response_via_sdk(sdk, b"".join(replay_response(stored)))
    text_deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert len(text_deltas) > 1
    assert text_deltas[-1].snapshot == LONG_TEXT
    assert all(event.logprobs == [] for event in text_deltas)
    argument_deltas = [event for event in events if event.type == "response.function_call_arguments.delta"]
    assert argument_deltas[-1].snapshot == stored["output"][1]["arguments"]
    text_done = next(event for event in events if event.type == "response.output_text.done")
    assert text_done.text == LONG_TEXT and text_done.item_id == stored["output"][0]["id"]


def test_replay_response__follows_the_fake_upstreams_grammar():
    """Two independent writings of OpenAI's grammar agree, once runs of deltas are one step."""
    stored = make_response("multiple_items")
    stored["output"] += make_response("refusal")["output"] + make_response("computer_call")["output"]

    def steps(events):
        kinds = []
        for event in events:
            key = (event["type"], event.get("output_index"), event.get("content_index"),
                   event.get("summary_index"))
            if not (kinds and kinds[-1] == key and event["type"].endswith(".delta")):
                kinds.append(key)
        return kinds

    replayed = [json.loads(chunk.split(b"\ndata: ", 1)[1]) for chunk in replay_response(stored)]
    assert steps(replayed) == steps(responses_event_payloads(stored))


def test_replay_response__frames_name_each_event_by_its_type():
    for chunk in replay_response(make_response("reasoning")):
        name_line, data_line, blank = chunk.split(b"\n", 2)
        assert blank == b"\n"
        assert json.loads(data_line.removeprefix(b"data: "))["type"].encode() == name_line.removeprefix(b"event: ")


# Any text a model can write: every plane, control characters, blank lines, SSE look-alikes.
ANY_TEXT = st.one_of(st.text(max_size=120), st.sampled_from(["", "\n\ndata: [DONE]\n\n", "event: error\r\n\r\n",
                                                             "lone \ud800 surrogate", "\u2028\x00\x7f"]))
ITEM_SPECS = st.one_of(
    st.builds(lambda text: {"type": "message", "text": text}, ANY_TEXT),
    st.builds(lambda name, arguments: {"type": "function_call", "name": name or "f", "arguments": arguments},
              st.text(max_size=12), ANY_TEXT),
    st.builds(lambda summary: {"type": "reasoning", "summary": summary}, st.lists(ANY_TEXT, max_size=3)),
    st.builds(lambda x, y: {"type": "computer_call", "action": {**CLICK, "x": x, "y": y}},
              st.integers(0, 4000), st.integers(0, 4000)),
)
RESPONSES = st.builds(
    lambda specs, number: responses_answer({"model": "m", "input": "go"}, number, scripted=specs),
    st.lists(ITEM_SPECS, max_size=5), st.integers(1, 10**6))


def test_replay_response__sdk_rebuilds_text_that_looks_like_framing_or_is_not_utf8(sdk):
    texts = ["\n\ndata: [DONE]\n\n", "event: error\r\n\r\ndata: {}", "lone \ud800 surrogate", "é漢🙂" * 40]
    stored = responses_answer({"model": "m", "input": "go"}, 5, scripted=[
        {"type": "message", "text": text} for text in texts] + [
        {"type": "function_call", "name": "f", "arguments": text} for text in texts])
    final, events = final_response_via_sdk(sdk, b"".join(replay_response(stored)))
    assert final == stored
    assert [event.text for event in events if event.type == "response.output_text.done"] == texts


@hypothesis_settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stored=RESPONSES)
def test_replay_response__sdk_rebuilds_any_stored_response(sdk, stored):
    final, _ = final_response_via_sdk(sdk, b"".join(replay_response(stored)))
    assert final == stored


# --------------------------------------------------------------------------- assembly


def stream_bytes(events: list[dict]) -> bytes:
    return "".join(frame(event) for event in events).encode()


def assemble(data: bytes, cuts: list[int]) -> tuple[ResponsesStreamAssembler, bytes]:
    assembler = ResponsesStreamAssembler()
    out = []
    edges = [0, *cuts, len(data)]
    for start, end in zip(edges, edges[1:]):
        out.append(assembler.feed(data[start:end]))
    out.append(assembler.finish())
    return assembler, b"".join(out)


def test_responses_stream_assembler__any_split_point_gives_the_fakes_response():
    stored = make_response("function_call")
    data = "".join(responses_events(stored)).encode()
    for cut in range(len(data) + 1):
        assembler, relayed = assemble(data, [cut])
        assert relayed == data, cut
        assert assembler.done
        assert assembler.completion() == stored, cut


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_responses_stream_assembler__byte_by_byte_gives_the_fakes_response(script):
    stored = make_response(script)
    data = "".join(responses_events(stored)).encode()
    assembler, relayed = assemble(data, list(range(1, len(data))))
    assert relayed == data
    assert assembler.completion() == stored


@hypothesis_settings(max_examples=100, deadline=None)
@given(stored=RESPONSES, cuts=st.lists(st.integers(0, 10**5), max_size=8), replayed=st.booleans())
def test_responses_stream_assembler__any_response_cut_anywhere_assembles_back(stored, cuts, replayed):
    data = b"".join(replay_response(stored)) if replayed else "".join(responses_events(stored)).encode()
    assembler, relayed = assemble(data, sorted(cut % (len(data) + 1) for cut in cuts))
    assert relayed == data
    assert assembler.completion() == stored


def test_responses_stream_assembler__crlf_framing_and_comments_pass_through():
    stored = make_response("reasoning")
    data = ": keep-alive\r\n\r\n" + "".join(event.replace("\n", "\r\n") for event in responses_events(stored))
    data = data.encode()
    for cuts in ([1], [len(data) // 3, len(data) // 2], list(range(7, len(data), 7))):
        assembler, relayed = assemble(data, cuts)
        assert relayed == data
        assert assembler.completion() == stored


def test_responses_stream_assembler__replayed_stream_assembles_back_to_stored():
    stored = extra_rich_response()
    assembler, _ = assemble(b"".join(replay_response(stored)), [])
    assert assembler.completion() == stored


def test_responses_stream_assembler__completed_without_output_takes_the_done_items():
    stored = make_response("multiple_items")
    events = responses_event_payloads(stored)
    events[-1] = {**events[-1], "response": {k: v for k, v in stored.items() if k != "output"}}
    assembler, _ = assemble(stream_bytes(events), [])
    assert assembler.completion() == stored


def test_responses_stream_assembler__unterminated_last_event_is_sent_on_at_finish():
    stored = make_response("text")
    data = "".join(responses_events(stored)).encode().rstrip(b"\n")
    assembler = ResponsesStreamAssembler()
    relayed = assembler.feed(data)
    assert not assembler.done
    tail = assembler.finish()
    assert relayed + tail == data + b"\n\n"
    assert assembler.completion() == stored


@pytest.mark.parametrize("events", [
    pytest.param(failed_payloads, id="failed"),
    pytest.param(incomplete_payloads, id="incomplete"),
    pytest.param(error_payloads, id="error"),
])
def test_responses_stream_assembler__an_unsuccessful_ending_is_relayed_and_not_storable(events):
    data = stream_bytes(events(make_response("multiple_items")))
    assembler, relayed = assemble(data, [len(data) // 2])
    assert relayed == data  # relayed as it came, nothing added: the upstream said what went wrong
    assert assembler.completion() is None


def test_responses_stream_assembler__truncated_stream_is_not_storable_and_ends_in_an_error_the_sdk_raises(sdk):
    data = stream_bytes(truncated_payloads(make_response("long_text")))
    assembler, relayed = assemble(data, [len(data) // 3])
    assert not assembler.done and assembler.completion() is None
    assert relayed.startswith(data) and relayed != data
    error = json.loads(relayed[len(data):].split(b"\ndata: ", 1)[1])
    assert error["type"] == "error" and error["code"] == "upstream_stream_failed"
    assert error["sequence_number"] == len(truncated_payloads(make_response("long_text")))
    with pytest.raises(openai.APIError, match="ended before it was complete"):
        final_response_via_sdk(sdk, relayed)


def test_responses_stream_assembler__fail_midway_drops_the_unfinished_event():
    data = "".join(responses_events(make_response("text"))).encode()
    assembler = ResponsesStreamAssembler()
    relayed = assembler.feed(data[:len(data) // 2])
    ending = assembler.fail("upstream timed out", code="upstream_timeout")
    assert ending.startswith(b"event: error\ndata: ") and ending.endswith(b"\n\n")
    assert json.loads(ending.split(b"data: ", 1)[1])["error"]["code"] == "upstream_timeout"
    assert (relayed + ending).count(b"\n\n") == relayed.count(b"\n\n") + 1
    assert assembler.finish() == b"" and assembler.completion() is None


def test_responses_stream_assembler__fail_after_completed_adds_nothing():
    stored = make_response("text")
    assembler = ResponsesStreamAssembler()
    assembler.feed("".join(responses_events(stored)).encode())
    assert assembler.fail("client went away") == b""
    assert assembler.completion() is None  # a failure after the end still means "do not store"


@pytest.mark.parametrize("bad_event", [
    b"event: response.output_text.delta\ndata: {not json\n\n",
    b"data: [1, 2]\n\n",
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","error":{"message":"x"}}\n\n',
])
def test_responses_stream_assembler__a_malformed_or_error_event_makes_the_stream_unstorable(bad_event):
    events = responses_events(make_response("text"))
    data = "".join(events[:3]).encode() + bad_event + "".join(events[3:]).encode()
    assembler, relayed = assemble(data, [])
    assert relayed == data
    assert assembler.completion() is None


def test_responses_stream_assembler__a_completed_response_that_is_not_completed_is_not_storable():
    stored = make_response("text")
    events = responses_event_payloads(stored)
    events[-1]["response"] = {**stored, "status": "incomplete"}
    assembler, _ = assemble(stream_bytes(events), [])
    assert assembler.done and assembler.completion() is None


# --------------------------------------------------------------------------- requests and answers


@pytest.mark.parametrize("body", [
    {"model": "gpt-4.1", "input": "hello"},
    {"model": "gpt-4.1", "input": [{"role": "user", "content": "hi"}], "stream": True},
    {"model": "gpt-4.1", "previous_response_id": "resp_1", "input": []},
    {"prompt": {"id": "pmpt_1"}},  # a stored prompt names the model
    {"model": "gpt-4.1", "input": "hi", "stream": None},
])
def test_validate_responses__accepts_what_the_api_accepts(body):
    validate_responses(body)


@pytest.mark.parametrize("body, param", [
    ({"input": "hi"}, "model"),
    ({"model": "  ", "input": "hi"}, "model"),
    ({"model": 4, "input": "hi"}, "model"),
    ({"model": "m", "input": 5}, "input"),
    ({"model": "m", "input": {"role": "user"}}, "input"),
    ({"model": "m", "input": [{"role": "user", "content": "a"}, "b"]}, "input[1]"),
    ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"model": "m", "input": [{"role": "user"}]}, "input[0].content"),
    ({"model": "m", "input": "hi", "stream": "yes"}, "stream"),
])
def test_validate_responses__rejects_with_the_parameter_named(body, param):
    with pytest.raises(InvalidRequest) as raised:
        validate_responses(body)
    assert raised.value.param == param
    assert raised.value.status == 400
    assert raised.value.body()["error"]["type"] == "invalid_request_error"


def test_bypass_reason__only_background_requests_bypass_the_cache():
    assert "background" in bypass_reason({"model": "m", "input": "hi", "background": True})
    assert bypass_reason({"model": "m", "input": "hi", "background": False, "store": False}) is None
    assert bypass_reason({"model": "m", "input": "hi", "previous_response_id": "resp_1"}) is None


@pytest.mark.parametrize("data, reason", [
    ([], "not a JSON object"),
    ({"error": {"message": "x"}, "status": "failed"}, "error"),
    ({"status": "queued", "background": True, "output": []}, "background"),
    ({"status": "incomplete", "output": []}, "incomplete"),
    ({"status": "in_progress", "output": []}, "in_progress"),
    ({"status": "completed", "output": None}, "no output"),
])
def test_storable_reason__names_why_an_answer_is_not_stored(data, reason):
    assert reason in storable_reason(data)


def test_storable_reason__a_completed_response_is_storable():
    assert storable_reason(make_response("multiple_items")) is None


def test_usage_figures__reads_responses_usage():
    usage = extra_rich_response()["usage"]
    assert usage_figures(extra_rich_response()) == UsageFigures(usage["input_tokens"], usage["output_tokens"],
                                                                5, 0.00042)
    assert usage_figures(make_response("text")).cost_usd is None
    assert usage_figures({"usage": None}) == UsageFigures(0, 0, 0, None)
    malformed = {"usage": {"input_tokens": "9", "output_tokens": -1, "cost": True}}
    assert usage_figures(malformed) == UsageFigures(0, 0, 0, None)
    assert usage_figures([]) == UsageFigures(0, 0, 0, None)


def computer_use_request() -> dict:
    """A computer-use turn that echoes the previous answer's items and carries screenshots."""
    return {
        "model": "computer-use-preview",
        "previous_response_id": "resp_prev",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "What is on screen?"},
                {"type": "input_image", "image_url": PNG, "detail": "auto"},
                {"type": "input_image", "image_url": "https://example.com/a.png"},
                {"type": "input_image", "file_id": "file_1"},
            ]},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "computer_call", "id": "cu_1", "call_id": "call_1", "action": CLICK,
             "pending_safety_checks": [SAFETY_CHECK], "status": "completed"},
            {"type": "computer_call_output", "call_id": "call_1", "acknowledged_safety_checks": [SAFETY_CHECK],
             "output": {"type": "computer_screenshot", "image_url": SCREENSHOT}},
            {"type": "function_call", "id": "fc_1", "call_id": "call_2", "name": "read", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_2", "output": [
                {"type": "input_text", "text": "page"}, {"type": "input_image", "image_url": PNG}]},
            {"type": "function_call_output", "call_id": "call_3", "output": "plain text"},
            {"type": "item_reference", "id": "msg_0"},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        ],
    }


def test_inline_images__finds_every_inline_image_in_document_order():
    body = computer_use_request()
    items = body["input"]
    slots = list(inline_images(body))
    assert [(slot.holder, slot.key) for slot in slots] == [
        (items[0]["content"][1], "image_url"),
        (items[3]["output"], "image_url"),
        (items[5]["output"][1], "image_url"),
    ]
    assert all(slot.encoding == "data_url" and slot.media_type is None for slot in slots)
    for slot in slots:  # the holders are the request's own dicts: replacing the text edits the body
        slot.holder[slot.key] = "sha256:digest"
    assert PNG not in json.dumps(body) and SCREENSHOT not in json.dumps(body)


def test_inline_images__a_request_without_inline_images_has_none():
    assert list(inline_images({"model": "m", "input": "hi"})) == []
    assert list(inline_images({"model": "m", "input": [{"role": "user", "content": "hi"}, "junk"]})) == []


def test_tool_call_ids__finds_every_echoed_id_in_document_order():
    body = computer_use_request()
    ids = [slot.holder[slot.key] for slot in tool_call_ids(body)]
    assert ids == ["rs_1", "cu_1", "call_1", "cu_sc_67cb", "call_1", "cu_sc_67cb", "fc_1", "call_2", "call_2",
                   "call_3", "msg_0", "msg_1"]
    for slot in tool_call_ids(body):
        slot.holder[slot.key] = "id_0"
    assert "call_1" not in json.dumps(body) and "cu_sc_67cb" not in json.dumps(body)
    assert body["previous_response_id"] == "resp_prev"  # a response id, part of the key, not a call id


# --------------------------------------------------------------------------- the fake itself


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_responses_events__the_sdk_reads_the_fakes_stream_as_its_response(sdk, script):
    stored = make_response(script)
    final, events = final_response_via_sdk(sdk, "".join(responses_events(stored)).encode())
    assert final == stored
    assert [event.sequence_number for event in events] == list(range(len(events)))


def test_responses_events__the_sdk_sees_the_fakes_failures_as_failures(sdk):
    stored = make_response("multiple_items")
    with pytest.raises(openai.APIError, match="Too Many Requests"):
        final_response_via_sdk(sdk, stream_bytes(error_payloads(stored)))
    for events in (failed_payloads(stored), incomplete_payloads(stored), truncated_payloads(stored)):
        with pytest.raises(RuntimeError, match="response.completed"):
            final_response_via_sdk(sdk, stream_bytes(events))



def test_responses_answer__echoes_the_input_with_ids_unique_per_call():
    first = responses_answer({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "click OK"}]}]}, 1)
    second = responses_answer({"model": "m", "input": "click OK"}, 2)
    texts = [answer["output"][0]["content"][0]["text"] for answer in (first, second)]
    assert texts == ["echo: click OK", "echo: click OK"]
    assert first["id"] != second["id"] and first["id"].startswith("resp_")
    assert first["output"][0]["id"] != second["output"][0]["id"]
    assert storable_reason(first) is None
    queued = responses_answer({"model": "m", "input": "later", "background": True}, 4)
    assert (queued["status"], queued["output"], queued["background"]) == ("queued", [], True)
    assert "background" in storable_reason(queued)
    scripted = make_response("multiple_items", 3)
    assert len({item.get("id") for item in scripted["output"]}) == 6
    assert len({item.get("call_id") for item in scripted["output"] if "call_id" in item}) == 4
