"""Legacy completions (``/v1/completions``): ``prompt`` in, ``choices[].text`` out.

Same framing as chat (``ChoicesApi``): ``text`` pieces per choice ``index``, the last chunk of a
choice has ``text: ""`` and its ``finish_reason``; ``include_usage`` works the same way.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator, Mapping

from apis.base import require_text_or_list
from apis.chat import ChoicesApi, requested_n
from streaming import DONE_EVENT, ChoicesAssembler, ChunkFrame, choice_extras, sorted_choices, split_text


def replay_text_completion(completion: dict, include_usage: bool) -> Iterator[bytes]:
    frame = ChunkFrame(completion, "text_completion", include_usage)
    for index, choice in sorted_choices(completion):
        logprobs = choice.get("logprobs")
        for piece in split_text(choice.get("text") or ""):
            yield frame({"text": piece, "index": index, "logprobs": logprobs, "finish_reason": None})
            logprobs = None
        yield frame({"text": "", "index": index, "logprobs": logprobs,
                     "finish_reason": choice.get("finish_reason"), **choice_extras(choice)})
    if include_usage and completion.get("usage") is not None:
        yield frame.usage(completion["usage"])
    yield DONE_EVENT


class TextCompletionAssembler(ChoicesAssembler):
    """Folds legacy text_completion chunks into one text_completion."""

    object_name = "text_completion"

    def _new_choice(self, index: int) -> dict:
        return {"text": "", "index": index, "logprobs": None, "finish_reason": None}

    def _add_choice(self, index: int, piece: dict) -> None:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = self._new_choice(index)
        text = piece.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError("text is not a string")
        choice["text"] += text or ""
        self._add_logprobs(choice, piece.get("logprobs"))
        self._add_choice_fields(choice, piece)


class CompletionApi(ChoicesApi):
    mode = "completion"
    routes = ("/v1/completions", "/completions", "/api/v1/completions")
    upstream_path = "/completions"
    chunk_assembler = TextCompletionAssembler

    def validate_input(self, body: Mapping[str, Any]) -> None:
        require_text_or_list(body, "prompt")

    def expected_choice_count(self, body: Mapping[str, Any]) -> int | None:
        """``n`` per prompt: a list of prompts (strings or token arrays) answers each."""
        n = requested_n(body)
        if n is None:
            return None
        prompt = body.get("prompt")
        if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return n
        if isinstance(prompt, list) and all(isinstance(item, (str, list)) for item in prompt):
            return n * len(prompt)
        return None

    def replay(self, answer: dict, variant: Hashable) -> Iterator[bytes]:
        return replay_text_completion(answer, bool(variant))


COMPLETION = CompletionApi()
