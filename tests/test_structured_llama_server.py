"""Structured output for real: the reflection stages through `OpenAIOracle` against the real
llama.cpp server (the embedded SmolLM2 GGUF), recognised as llama.cpp with no other argument, so
every request carries the stage's GBNF grammar; every answer parses, and a row is `ok` exactly
when no field was ended by its length bound (else `truncated`: the grammar, not the model, ended it)."""

from __future__ import annotations

import json

import pytest

from reflectune_hf.reflection.extract import extract_instruction_reflection, extract_response_reflection
from reflectune_hf.oracles import OpenAIOracle, backends
from reflectune_hf.oracles.stage_formats import fields_at_bound, format_outcome, stage_answer_format
from reflectune_hf.reflection.stages import ReflectInstruction, ReflectResponse

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Four rows (>= 95% ok means all four): each answer costs ~100 tokens, each token a pass of
# llama.cpp's grammar sampler over the whole 49k vocabulary (~0.1 s a token on one core).
ROWS = 4
MAX_TOKENS = 192  # the quickstart's budget


def test_reflection_through_the_real_llama_server_with_the_grammar_parses(llama_server, sample):
    backends.forget_detections()
    rows = sample.filter(lambda r: not r["input"].strip()).select(range(ROWS)).to_dict()
    oracle = OpenAIOracle(llama_server.model, base_url=llama_server.base_url, max_concurrency=4)
    assert oracle.served_backend() == "plain"  # nothing asked yet
    outcomes = {}
    for stage, extract in ((ReflectInstruction(oracle, max_tokens=MAX_TOKENS), extract_instruction_reflection),
                           (ReflectResponse(oracle, max_tokens=MAX_TOKENS), extract_response_reflection)):
        out = stage(rows)
        parsed = extract({**rows, **out})
        outcomes[stage.stage_name] = [format_outcome(s, a) for s, a in
                                      zip(parsed["reflection_status"], out["reflection_attempts"])]
        ok = parsed["reflection_status"].count("ok") / ROWS
        print(json.dumps({"stage": stage.stage_name, "ok_rate": ok, "statuses": parsed["reflection_status"],
                          "outcomes": outcomes[stage.stage_name]}))
        # The 135M model often loops until a field's bound: then the row is `truncated`, never `ok`.
        cut = ["truncated" if reason == "length" else "ok" for reason in out["reflection_finish_reason"]]
        assert parsed["reflection_status"] == cut, (stage.stage_name, parsed["reflection_status"], out["reflection_raw"])
        shapes = [stage_answer_format(stage.answer_shape, MAX_TOKENS * k) for k in (1, 2)]
        for status, raw, attempts in zip(cut, out["reflection_raw"], out["reflection_attempts"]):
            if status == "ok":  # the kept answer is the last attempt's, sent with 1x or 2x the budget
                assert not fields_at_bound(shapes[attempts - 1], raw), raw
            else:
                assert any(fields_at_bound(shape, raw) for shape in shapes), raw
    assert oracle.served_backend() == "llamacpp"  # recognised from /v1/models with no other argument


def test_a_tight_budget_still_gets_the_marker(llama_server):
    """48 tokens: the grammar bounds the analysis (20 characters), so the marker always comes."""
    backends.forget_detections()
    oracle = OpenAIOracle(llama_server.model, base_url=llama_server.base_url, backend="llamacpp", cache=False)
    out = ReflectResponse(oracle, max_tokens=48, format_retries=0)(
        {"id": [0, 1], "instruction": ["Name a primary colour.", "What is 2 + 2?"], "output": ["Green.", "5"]})
    assert out["reflection_error"] == ["", ""]
    assert [raw.count("[Better Answer] ") for raw in out["reflection_raw"]] == [1, 1], out["reflection_raw"]
    assert all(len(raw.split("[Better Answer]")[0]) <= 20 for raw in out["reflection_raw"])
