"""The benchmark's relay floor: the least a Flask app under gunicorn can do to forward a
completion upstream with `requests` and pass the answer back.

It parses the JSON body (to see ``stream``), sends the client's bytes upstream over one shared
keep-alive adapter, and relays status, content type and body (piece by piece when streamed).
No cache, no checks, no headers of its own: what it adds over the upstream's time is what the
committed stack (gunicorn, Flask, requests) costs a miss before the cache does anything, so the
proxy's miss figures are shown beside it (`make bench`).
"""

from __future__ import annotations

import json
import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter


def create_app() -> Flask:
    app = Flask(__name__)
    base_url = os.environ["UPSTREAM_BASE_URL"].rstrip("/")
    adapters: dict[int, HTTPAdapter] = {}  # one per process, made after gunicorn forks

    def adapter() -> HTTPAdapter:
        made = adapters.get(os.getpid())
        if made is None:
            made = adapters.setdefault(os.getpid(), HTTPAdapter(pool_maxsize=512))
        return made

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        body = request.get_data()
        stream = bool(json.loads(body).get("stream"))
        prepared = requests.Request("POST", f"{base_url}/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer sk-relay"}).prepare()
        reply = adapter().send(prepared, stream=stream, timeout=30)
        content_type = reply.headers.get("Content-Type", "application/json")
        if not stream:
            return Response(reply.content, status=reply.status_code, content_type=content_type)

        def pieces():
            try:
                yield from reply.raw.stream(65536, decode_content=True)
            finally:
                reply.close()

        return Response(pieces(), status=reply.status_code, content_type=content_type)

    return app
