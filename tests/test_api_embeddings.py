"""Embeddings end to end with the official openai SDK: JSON only, the encoding in the key."""

from __future__ import annotations

import pytest

from fake_upstream import json_reply

STATUS = "X-Computer-Use-Cache"


def embed(client, **overrides):
    params = {"model": "text-embedding-3-small", "input": ["a screenshot caption", "another"], **overrides}
    raw = client.embeddings.with_raw_response.create(**params)
    return raw.parse(), raw.headers


def test_embeddings__miss_then_hit_returns_the_same_vectors(openai_client, fake_upstream):
    first, first_headers = embed(openai_client)
    second, second_headers = embed(openai_client)
    assert (first_headers[STATUS], second_headers[STATUS]) == ("MISS", "HIT")
    assert second.model_dump() == first.model_dump()
    assert len(first.data) == 2 and len(first.data[0].embedding) == 8
    assert isinstance(first.data[0].embedding[0], float)
    assert first.usage.prompt_tokens > 0
    calls = fake_upstream.calls("/embeddings")
    assert len(calls) == 1 and calls[0].json["encoding_format"] == "base64"  # the SDK's default


def test_embeddings__encoding_dimensions_and_input_are_keyed(openai_client, fake_upstream):
    _, base64_headers = embed(openai_client)
    floats, float_headers = embed(openai_client, encoding_format="float")
    _, dimension_headers = embed(openai_client, dimensions=4)
    _, input_headers = embed(openai_client, input="just one")
    floats_again, again_headers = embed(openai_client, encoding_format="float")
    statuses = [h[STATUS] for h in (base64_headers, float_headers, dimension_headers, input_headers, again_headers)]
    assert statuses == ["MISS", "MISS", "MISS", "MISS", "HIT"]
    assert floats_again.model_dump() == floats.model_dump()
    assert len(fake_upstream.calls("/embeddings")) == 4


def test_embeddings__bad_input_is_an_openai_error(openai_client, fake_upstream):
    import openai
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.embeddings.create(model="text-embedding-3-small", input=[])
    assert caught.value.body["param"] == "input"
    assert fake_upstream.calls("/embeddings") == []


def test_embeddings__answers_without_data_are_not_stored(http, proxy, fake_upstream):
    fake_upstream.enqueue(json_reply({"object": "list", "data": [], "model": "m"}))
    body = {"model": "m", "input": "x"}
    first = http.post(proxy.url + "/v1/embeddings", json=body)
    assert first.headers["X-Computer-Use-Cache-Store"].startswith("skipped")
    assert http.post(proxy.url + "/embeddings", json=body).headers[STATUS] == "MISS"


def test_embeddings__stream_flag_never_makes_a_stream(http, proxy, fake_upstream):
    body = {"model": "m", "input": "x", "stream": True}
    response = http.post(proxy.url + "/api/v1/embeddings", json=body)
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["object"] == "list"
