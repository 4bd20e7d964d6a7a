"""StreamCapture reads each event's data the same way whatever its shape (one line, several, no
space after the colon, non-ASCII text): same relayed bytes, same assembled completion."""

from __future__ import annotations

import json

import pytest

from apis.chat import ChatAssembler
from streaming import StreamCapture

HEADER = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
CHUNKS = [
    {**HEADER, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
     "usage": None},
    {**HEADER, "choices": [{"index": 0, "delta": {"content": "grüße 👋 "}, "finish_reason": None}], "usage": None},
    {**HEADER, "choices": [{"index": 0, "delta": {"content": "done"}, "finish_reason": "stop"}], "usage": None},
    {**HEADER, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
]


def _frames(shape: str) -> list[bytes]:
    frames = []
    for chunk in CHUNKS:
        text = json.dumps(chunk, ensure_ascii=False)
        if shape == "one line":
            frames.append(f"data: {text}\n\n".encode())
        elif shape == "no space":
            frames.append(f"data:{text}\n\n".encode())
        elif shape == "split over lines":
            middle = text.index(",") + 1  # between two members: the joining newline is whitespace
            frames.append(f"data: {text[:middle]}\ndata: {text[middle:]}\n\n".encode())
        else:  # with an event name before the data
            frames.append(f"event: chunk\ndata: {text}\n\n".encode())
    return frames + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("shape", ["one line", "no space", "split over lines", "named event"])
@pytest.mark.parametrize("drop_usage", [False, True])
def test_capture__every_event_shape_assembles_the_same_completion(shape, drop_usage):
    capture = StreamCapture(ChatAssembler(), drop_usage_chunk=drop_usage)
    relayed = b"".join(capture.feed(frame) for frame in _frames(shape)) + capture.finish()
    completion = capture.completion()
    assert completion is not None
    assert completion["choices"][0]["message"]["content"] == "grüße 👋 done"
    assert completion["usage"]["total_tokens"] == 5
    if drop_usage and shape in ("one line", "no space"):
        # The usage-only chunk is dropped; the others lose their "usage": null member and keep
        # every other byte as the upstream wrote them (its spacing here).
        expected = b"".join(frame.replace(b', "usage": null', b"") for frame in _frames(shape)[:3]) \
            + b"data: [DONE]\n\n"
        assert b'"usage"' not in expected and expected != b"".join(_frames(shape)[:3])
    elif drop_usage:  # an event over several lines is re-encoded without usage
        expected = b"".join(
            b"data: " + json.dumps({k: v for k, v in chunk.items() if k != "usage"}, ensure_ascii=False,
                                   separators=(",", ":")).encode() + b"\n\n"
            for chunk in CHUNKS[:3]) + b"data: [DONE]\n\n"
    else:  # relayed verbatim
        expected = b"".join(_frames(shape))
    assert relayed == expected


@pytest.mark.parametrize("member_first", [False, True])
def test_capture__dropping_usage_keeps_the_upstreams_own_bytes(member_first):
    """Number formats, spacing and escapes a re-encoding would change stay as they came."""
    usage = '"usage" : null'
    rest = '"id": "c", "choices": [{"index": 0, "delta": {"content": "\\ud83d\\udc4b caf\\u00e9"}, ' \
           '"logprobs": {"content": [{"token": "x", "logprob": -1E-5, "top_logprobs": []}]}, "finish_reason": null}]'
    text = "{" + (f"{usage} , {rest}" if member_first else f"{rest} , {usage}") + "}"
    capture = StreamCapture(ChatAssembler(), drop_usage_chunk=True)
    relayed = capture.feed(f"data: {text}\n\n".encode())
    assert relayed == ("data: {" + rest + "}\n\n").encode()
    assert json.loads(relayed[6:]) == {k: v for k, v in json.loads(text).items() if k != "usage"}


@pytest.mark.parametrize("text", [
    '{"id": "c", "choices": [{"index": 0, "delta": {"content": "usage"}}], "usage": null}',  # a value
    '{"id": "c", "choices": [{"index": 0, "delta": {}, "usage": null}], "usage": null}',  # nested
    '{"id": "c", "choices": [{"index": 0, "delta": {"content": "\\u0075"}}], "usage": null}',  # "u" escaped
])
def test_capture__usage_that_cannot_be_cut_out_safely_is_re_encoded(text):
    capture = StreamCapture(ChatAssembler(), drop_usage_chunk=True)
    relayed = capture.feed(f"data: {text}\n\n".encode())
    expected = {k: v for k, v in json.loads(text).items() if k != "usage"}
    assert relayed == b"data: " + json.dumps(expected, separators=(",", ":")).encode() + b"\n\n"


def test_capture__usage_in_utf16_data_is_re_encoded_not_cut():
    # Characters whose UTF-16 bytes spell '"usage": null,' must not be cut out of a string.
    tricky = "".join(map(chr, (0x7522, 0x6173, 0x6567, 0x3A22, 0x6E20, 0x6C75, 0x2C6C))) + "A"
    chunk = {"id": tricky, "choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": None}
    capture = StreamCapture(ChatAssembler(), drop_usage_chunk=True)
    relayed = capture.feed(b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-16-le") + b"\n\n")
    assert json.loads(relayed[6:]) == {"id": tricky, "choices": chunk["choices"]}


def test_capture__data_that_is_not_utf8_fails_the_capture_but_is_relayed():
    capture = StreamCapture(ChatAssembler())
    frame = b'data: {"id": "\xff"}\n\n'
    assert capture.feed(frame) == frame
    assert capture.failed
