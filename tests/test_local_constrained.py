"""TransformersOracle's constrained decoding: the real embedded model answers in the stage's shape."""

from __future__ import annotations

import re

import pytest

from reflectune_hf import load_sample
from reflectune_hf.reflection.extract import extract_instruction_reflection, extract_response_reflection
from reflectune_hf.oracles import ChatRequest, TransformersOracle
from reflectune_hf.oracles.stage_formats import fields_at_bound, stage_answer_format
from reflectune_hf.reflection.stages import ReflectInstruction, ReflectResponse

MAX_TOKENS = 96


@pytest.fixture(scope="module")
def oracle(smollm2_dir):
    return TransformersOracle(batch_size=4, max_new_tokens=MAX_TOKENS, cache=False)


def rows(n):
    data = load_sample()
    return data.select([i for i, x in enumerate(data["input"]) if not x][:n])


def check(ds, stage_kind):
    shape = stage_answer_format(stage_kind, MAX_TOKENS)
    raws, reasons = ds["reflection_raw"], ds["reflection_finish_reason"]
    assert all(reason in ("stop", "length") for reason in reasons)
    # every complete answer matches the shape's regex (a cut one is a prefix of one)
    assert all(re.fullmatch(shape.regex(), raw) for raw, reason in zip(raws, reasons) if reason == "stop")
    # every answer parses; a row is `ok` exactly when no field was ended by its length bound (the
    # 135M model often loops until the bound: then the format, not the model, ended the field)
    at_bound = ["truncated" if reason == "length" or fields_at_bound(shape, raw) else "ok"
                for raw, reason in zip(raws, reasons)]
    assert ds["reflection_status"] == at_bound, list(zip(ds["reflection_status"], raws))


@pytest.mark.slow
def test_response_reflection_is_in_the_shape(oracle):
    ds = rows(3).map(ReflectResponse(oracle, max_tokens=MAX_TOKENS, format_retries=0), batched=True)
    check(ds.map(extract_response_reflection, batched=True), "response")


@pytest.mark.slow
def test_instruction_reflection_is_in_the_shape(oracle):
    ds = rows(3).map(ReflectInstruction(oracle, max_tokens=MAX_TOKENS, format_retries=0), batched=True)
    check(ds.map(extract_instruction_reflection, batched=True), "instruction")


def test_format_is_enforced_or_dropped_as_asked(oracle):
    """A short answer under a ScoreLine shape starts with two scores; structured='off' drops the shape."""
    shape = stage_answer_format("judge", 24)
    request = ChatRequest([{"role": "user", "content": "Rate two answers from 0 to 10."}], max_tokens=24,
                          answer_format=shape)
    [result] = oracle.complete([request])
    assert result.ok and re.match(r"(10|[0-9](\.5)?) (10|[0-9](\.5)?)\n", result.text), result.text
    off = TransformersOracle(max_new_tokens=24, cache=False, structured="off")
    assert off._prepare(request).answer_format is None and oracle._prepare(request).answer_format == shape
    with pytest.raises(ValueError, match="structured must be"):
        TransformersOracle(structured="sometimes")
