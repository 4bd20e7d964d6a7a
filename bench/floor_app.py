"""The benchmark's floor: the least a Flask app under gunicorn can do for a JSON POST.

It parses the JSON body and answers with a fixed 1 KB JSON reply, so its figures are what any
Flask handler costs on this machine under the same gunicorn config; the cache is measured
against them (`make bench`).
"""

from __future__ import annotations

import json

from flask import Flask, Response, request

REPLY = json.dumps({"id": "floor", "object": "chat.completion", "padding": "x" * 960}).encode()


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/v1/chat/completions")
    def completion() -> Response:
        json.loads(request.get_data())
        return Response(REPLY, mimetype="application/json")

    return app


app = create_app()
