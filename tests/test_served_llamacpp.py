"""llama-cpp-python's off-by-one echo read shifted (`scoring.served_llamacpp`), against a
loopback that reproduces its answers (tests/llamacpp_loopback.py): values, forced-token
requests, statuses, the probe and the compact cache."""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from reflectune_hf.scoring.engine import Span
from reflectune_hf.scoring.served import StudentServer, StudentServerError
from reflectune_hf.scoring.served_llamacpp import ECHO_TOP_K, FORCE_BIAS, shifted_reading
from reflectune_hf.scoring.served_parse import ServedProblem

sys.path.insert(0, str(Path(__file__).parent))
from llamacpp_loopback import LlamaCppLoopback  # noqa: E402

MODEL = "smollm2-135m-instruct"
CAT, REPEAT, SPACE = "The cat sat on the mat.", "a a a", "Say Hi  there"


@pytest.fixture(scope="module")
def tokenizer():
    from reflectune_hf.models import load_tokenizer

    return load_tokenizer(MODEL)


def spans_and_likely(tokenizer):
    """Spans of the three texts, the fake model's likely pairs (every next token but " sat"
    after " cat"), and the positions whose value only a forced request gives."""
    likely, spans, forced = {}, [], set()
    for text in (CAT, REPEAT, SPACE):
        ids = tokenizer(text)["input_ids"]
        spans.append(Span(ids, 1, text=text))
        for p, t in zip(ids[:-1], ids[1:]):
            if tokenizer.decode([t]) != " sat":
                likely.setdefault(p, []).append(t)
        names = [tokenizer.decode([i]) for i in ids]
        forced.add((text, 1))  # the server has no top log-probabilities before the second token
        forced.update((text, i) for i in range(2, len(ids))
                      if names[i] in (" sat", " ") or names[i] == names[i - 1])
    assert {(t, i) for t, i in forced if i > 1} == {(CAT, 2), (REPEAT, 2), (SPACE, 2)}
    return spans, likely, forced


def expected_values(fake, span):
    return [float(fake.logprobs(p)[t]) for p, t in zip(span.ids[span.start - 1:-1], span.ids[span.start:])]


def test_shifted_reading_gives_each_tokens_value_after_the_local_context(tokenizer):
    spans, likely, forced = spans_and_likely(tokenizer)
    with LlamaCppLoopback(tokenizer, likely) as server:
        client = StudentServer(server.base_url, "student", cache=False)
        assert client.mode() == "llamacpp" and client.echo_shifted(tokenizer) is True
        probe = len(server.bodies)
        values = client.span_logprobs(tokenizer, spans)
        bodies = server.bodies[probe:]
        fake = server.fake
    sat = int(np.sum(fake.logprobs(spans[0].ids[1]) > fake.logprobs(spans[0].ids[1])[spans[0].ids[2]])) + 1
    assert sat > ECHO_TOP_K, "the test needs ' sat' outside the top-k"
    for span, got in zip(spans, values):
        assert got == expected_values(fake, span)  # exact: the fake model's value of our token after our context
    echoes = [b for b in bodies if b.get("echo")]
    assert sorted(b["prompt"] for b in echoes) == sorted([CAT, REPEAT, SPACE])  # no BOS text sent before
    assert all(b["logprobs"] == ECHO_TOP_K and b["max_tokens"] == 1 for b in echoes)
    sent_forced = set()
    for body in bodies:
        if body.get("echo"):
            continue
        assert set(body) == {"model", "prompt", "max_tokens", "temperature", "logprobs", "logit_bias"}
        (token, bias), = body["logit_bias"].items()
        assert bias == FORCE_BIAS and body["max_tokens"] == 1
        text = next(t for t in (CAT, REPEAT, SPACE) if t.startswith(body["prompt"]) and body["prompt"])
        ids = tokenizer(text)["input_ids"]
        position = len(tokenizer(body["prompt"])["input_ids"])
        assert ids[position] == int(token)
        sent_forced.add((text, position))
    assert sent_forced == forced


def test_a_server_without_the_off_by_one_is_read_as_it_is(tokenizer):
    spans, likely, _ = spans_and_likely(tokenizer)
    with LlamaCppLoopback(tokenizer, likely, reading="fixed") as server:
        client = StudentServer(server.base_url, "student", cache=False)
        assert client.echo_shifted(tokenizer) is False
        values = client.span_logprobs(tokenizer, spans)
        assert not any("logit_bias" in b for b in server.bodies[2:])
        assert values == [expected_values(server.fake, s) for s in spans]
    with LlamaCppLoopback(tokenizer, likely, reading="noise") as server:
        with pytest.raises(StudentServerError, match="neither reading"):
            StudentServer(server.base_url, "student", cache=False).echo_shifted(tokenizer)


def test_tokens_the_server_splits_otherwise_are_statuses_never_numbers(tokenizer):
    from reflectune_hf.scoring.ifd import IFDScorer

    spans, likely, _ = spans_and_likely(tokenizer)
    inside = "x <|im_start|> y"  # llama-cpp-python leaves the BOS token out of the echo
    with LlamaCppLoopback(tokenizer, likely) as server:
        client = StudentServer(server.base_url, "student", cache=False)
        (problem,) = client.span_logprobs(tokenizer, [Span(tokenizer(inside)["input_ids"], 3, text=inside)])
        assert problem.status == "misaligned"
    # an echo shorter than the server's prompt (a BOS token left out) is refused even where offsets align
    answer = {"choices": [{"logprobs": {"tokens": ["Hi", " there"], "text_offset": [0, 2],
                                        "token_logprobs": [None, -9.0], "top_logprobs": [None, {" there": -9.0}]}}],
              "usage": {"prompt_tokens": 3}}
    with pytest.raises(ServedProblem, match="BOS"):
        shifted_reading(answer, [1, 2], [2, 8], 1, "Hi there", frozenset())
    with LlamaCppLoopback(tokenizer, likely, prompt_tokens_off=1) as server:  # forced prompts tokenised otherwise
        client = StudentServer(server.base_url, "student", cache=False)
        got = client.span_logprobs(tokenizer, spans)
        assert [g.status for g in got] == ["misaligned"] * 3
        scorer = IFDScorer(MODEL, base_url=server.base_url, server_model="student", student_backend="llamacpp",
                           cache=False)
        out = scorer({"instruction": ["Name a colour."], "input": [""], "output": ["Blue is one."]})
    assert out["score_status"][0].startswith("misaligned:") and math.isnan(out["ifd"][0])


def test_the_cache_keeps_compact_echoes_and_a_rerun_sends_nothing(tokenizer):
    import os

    spans, likely, _ = spans_and_likely(tokenizer)
    with LlamaCppLoopback(tokenizer, likely) as server:
        first = StudentServer(server.base_url, "student").span_logprobs(tokenizer, spans)
        sent = len(server.bodies)
        again = StudentServer(server.base_url, "student")
        assert again.span_logprobs(tokenizer, spans) == first
        assert len(server.bodies) == sent and again.usage["sent"] == 0
    rows = sqlite3.connect(os.environ["REFLECTUNE_HF_ORACLE_CACHE"]).execute("SELECT answer FROM served_student")
    answers = [json.loads(answer)["choices"][0] for (answer,) in rows]
    echoes = [a["logprobs"]["top_logprobs"] for a in answers if a["text"].startswith((CAT, REPEAT, SPACE))]
    assert len(echoes) == 3  # each position keeps only the top log-probability the reading uses
    assert all(t is None or len(t) <= 1 for tops in echoes for t in tops)
    assert sum(len(t) == 1 for tops in echoes for t in tops if t is not None) >= 3
