"""A scripted oracle for the stage tests: deterministic canned answers, the `Oracle` protocol.

A test double for the logic of the stages (re-asks, per-row oracle errors, batching, ids), not a
stand-in for the real oracle: tests/test_variants_server.py runs the stages against the real
llama.cpp server. Importable from subprocesses (the fingerprint and cache tests), so its pickled
state is its configuration only (`LazyState`), like a real oracle's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from reflectune_hf.oracles.base import ChatRequest, ChatResult
from reflectune_hf.utils import LazyState

ERROR_PREFIX = "!error "
LENGTH_PREFIX = "!length "  # an answer cut by the token limit (finish_reason "length")


@dataclass
class ScriptedOracle(LazyState):
    """Answers by rule: the first `(needle, answers)` of `rules` whose needle occurs in the
    request's messages answers `answers[attempt]` (the last one for later attempts), where the
    attempt is the request's `seed` (None -> 0), as the stages number their re-asks. `default`
    answers when no rule matches. An answer starting with "!error " is a failed result; one
    starting with "!length " is the rest of the text with `finish_reason` "length".

    Runtime state (left out of the pickled state): `requests` (every request received) and
    `calls` (the number of `complete` calls).
    """

    model: str = "scripted"
    rules: tuple = ()
    default: tuple = ("",)
    requests: Optional[list] = field(default=None, repr=False, compare=False)
    calls: Optional[int] = field(default=None, repr=False, compare=False)

    _transient: ClassVar[tuple[str, ...]] = ("requests", "calls")

    def answer(self, request: ChatRequest) -> str:
        text = "\n".join(m["content"] for m in request.message_dicts)
        answers = next((a for needle, a in self.rules if needle in text), self.default)
        attempt = request.seed or 0
        return answers[min(attempt, len(answers) - 1)]

    def complete(self, requests: list[ChatRequest]) -> list[ChatResult]:
        self.requests = (self.requests or []) + list(requests)
        self.calls = (self.calls or 0) + 1
        results = []
        for request in requests:
            text = self.answer(request)
            if text.startswith(ERROR_PREFIX):
                results.append(ChatResult.failure(text[len(ERROR_PREFIX):]))
            else:
                reason = "length" if text.startswith(LENGTH_PREFIX) else "stop"
                text = text[len(LENGTH_PREFIX):] if reason == "length" else text
                usage = {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10}
                results.append(ChatResult(texts=[text], finish_reasons=[reason], usage=usage))
        return results


# Canned answers in the requested formats (REFERENCE.md §3-§4).
GOOD_INSTRUCTION = "1. Vague.\n2. [New Instruction] Explain {topic} in three steps. [End]\n3. [New Answer] Step one about {topic}. [End]"
GOOD_RESPONSE = "1. Too short.\n2. [Better Answer] A detailed answer about {topic}. [End]"
GOOD_COMPRESS = "[New Instruction] {topic}, using the given input. [End]"


def demo_oracle(model: str = "scripted") -> ScriptedOracle:
    """An oracle that answers every stage in format (used across processes by the cache tests)."""
    return ScriptedOracle(
        model=model,
        rules=(
            ("quality of a given instruction.", (GOOD_INSTRUCTION.format(topic="it"),)),
            ("quality of the answer", (GOOD_RESPONSE.format(topic="it"),)),
            ("careful editor", (GOOD_COMPRESS.format(topic="Do it"),)),
        ),
    )
