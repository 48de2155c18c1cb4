"""Answer shapes (reflectune_hf.oracles.structured): regex, GBNF, JSON schema and from_json agree,
and the canonical text they produce parses `ok` with the project's own parsers."""

from __future__ import annotations

import json
import re

import pytest

from reflectune_hf.reflection.extract import (instruction_status, parse_compressed_instruction, parse_instruction_reflection,
                                   parse_response_reflection)
from reflectune_hf.evaluation.judge import parse_judge_scores
from reflectune_hf.oracles.base import ChatRequest
from reflectune_hf.oracles.structured import (Field, MarkedFields, RankingAnswer, ScoreLine, is_answer_format,
                                              shape_from_dict)
from reflectune_hf.tuna.parse import extract_reference_response, parse_ranking

INSTRUCTION = MarkedFields((Field("New Instruction", 300), Field("New Answer", 900)), analysis_max_chars=400)
RESPONSE = MarkedFields((Field("Better Answer", 900),), analysis_max_chars=400)
COMPRESS = MarkedFields((Field("New Instruction", 300),))
SHAPES = [INSTRUCTION, RESPONSE, COMPRESS, ScoreLine(300), RankingAnswer(4, 200, 300)]

INSTRUCTION_JSON = {"analysis": "1. The instruction is vague; the answer is wrong.",
                    "new_instruction": "Write a Python function that returns arr[0] + arr[-1] for a list [1, 2].",
                    "new_answer": "def f(arr):\n    return arr[0] + arr[-1]\n\nFor [1, 2] it returns 3."}


def test_shapes_are_frozen_hashable_and_json_able():
    for shape in SHAPES:
        data = shape.to_dict()
        assert json.loads(json.dumps(data)) == data
        assert shape_from_dict(data) == shape and hash(shape_from_dict(data)) == hash(shape)
        assert is_answer_format(shape)
        with pytest.raises(Exception):
            shape.analysis_max_chars = 1  # frozen


def test_marked_fields_round_trip_parses_ok():
    text = INSTRUCTION.from_json(json.dumps(INSTRUCTION_JSON))
    assert re.fullmatch(INSTRUCTION.regex(), text)
    ins, ans = parse_instruction_reflection(text)
    assert instruction_status(ins, ans) == "ok"
    assert ins == INSTRUCTION_JSON["new_instruction"] and ans == INSTRUCTION_JSON["new_answer"]

    better = RESPONSE.from_json(json.dumps({"analysis": "Too short.", "better_answer": "Paris, France."}))
    assert re.fullmatch(RESPONSE.regex(), better) and parse_response_reflection(better) == "Paris, France."
    compressed = COMPRESS.from_json('{"new_instruction": "Translate \'Good morning\' to French."}')
    assert compressed == "[New Instruction] Translate 'Good morning' to French. [End]"
    assert re.fullmatch(COMPRESS.regex(), compressed) and parse_compressed_instruction(compressed)


def test_marked_fields_regex_accepts_what_models_write_and_rejects_markers_inside_fields():
    ok = ["1. Vague.\n2. [New Instruction] Do X. [End]\n3. [New Answer] Done. [End]",
          "[New Instruction] Do X. [End]\n\n3. [New Answer] Done [with care]. [End]"]
    for text in ok:
        assert re.fullmatch(INSTRUCTION.regex(), text), text
        assert instruction_status(*parse_instruction_reflection(text)) == "ok"
    bad = ["[New Instruction] Do [End] X. [End]\n[New Answer] Y [End]",  # an [End] inside a field
           "[New Instruction] Do X. [End]\n[New Answer] Y [New Answer] Z [End]",
           "Analysis with [brackets]\n[New Instruction] X [End]\n[New Answer] Y [End]",
           "[New Instruction]  [End]\n[New Answer] Y [End]",  # an empty field
           "[New Instruction] " + "x" * 301 + " [End]\n[New Answer] Y [End]",  # too long
           "[New Instruction] Use `x [End] [New Answer] y` [End]"]  # fields on one line: a code span hides markers
    for text in bad:
        assert not re.fullmatch(INSTRUCTION.regex(), text), text


def test_a_field_cannot_be_the_prompts_placeholder():
    for text in ["[Better Answer] your answer [End]", "[Better Answer] your better answer [End]"]:
        assert not re.fullmatch(RESPONSE.regex(), text) and parse_response_reflection(text) is None
    for text in ["[Better Answer] Your task is done. [End]", "[Better Answer] yes, 4. [End]",
                 "[Better Answer] yours truly [End]", "[Better Answer] ya [End]"]:
        assert re.fullmatch(RESPONSE.regex(), text) and parse_response_reflection(text), text


def test_score_line_round_trip():
    shape = ScoreLine(300)
    text = shape.from_json('{"score_1": 8, "score_2": 6.5, "explanation": "A is precise."}')
    assert text == "8 6.5\nA is precise." and re.fullmatch(shape.regex(), text)
    assert parse_judge_scores(text) == (8.0, 6.5)
    assert not re.fullmatch(shape.regex(), "11 3\nwhy")
    assert not re.fullmatch(shape.regex(), "8, 7\nwhy")


def test_ranking_round_trip():
    shape = RankingAnswer(num_responses=4, analysis_max_chars=200, reference_max_chars=300)
    data = {"analysis": "Open-ended. Responses 1 and 2 are duplicates.",
            "reference_response": "A full answer.\n\n- one",
            "scores": [9, 7, 7, 3, 15], "rank": [4, 0, 1, 3]}
    text = shape.from_json(json.dumps(data))
    assert re.fullmatch(shape.regex(), text), text
    parsed = parse_ranking(text, 5)
    assert parsed.found and parsed.rank == [4, 0, 1, 3] and not parsed.repaired
    assert extract_reference_response(text, 4) == "A full answer.\n\n- one"
    assert not re.fullmatch(shape.regex(), text.replace("rank: [4", "rank: [5"))



def test_ranking_from_json_refuses_a_reference_the_parser_would_not_read_back_whole():
    # A markdown heading ("## Step 2") ended the reference early, and a "###Response 4:" in the
    # analysis gave the wrong one: the row was `ok` with that reference. Like `regex()`, no "#" there.
    shape = RankingAnswer(num_responses=4, analysis_max_chars=200, reference_max_chars=300)
    base = {"analysis": "Open-ended.", "reference_response": "Mix.", "scores": [1, 2, 3, 4, 15], "rank": [4, 0]}
    for change in ({"reference_response": "Here is a plan.\n## Step 2\nBake."},
                   {"analysis": "I write mine as ###Response 4: below.", "reference_response": "Blue."}):
        with pytest.raises(ValueError, match="holds one of"):
            shape.from_json(json.dumps({**base, **change}))
    text = shape.from_json(json.dumps({**base, "reference_response": "Plan:\n\n1. Mix (2 [cups]).\n2. Bake."}))
    assert extract_reference_response(text, 4) == "Plan:\n\n1. Mix (2 [cups]).\n2. Bake."
    assert re.fullmatch(shape.regex(), text)

def test_from_json_rejects_what_is_not_the_shape():
    with pytest.raises(ValueError, match="not JSON"):
        INSTRUCTION.from_json("[New Instruction] x [End]")
    with pytest.raises(ValueError, match="new_answer"):
        INSTRUCTION.from_json('{"new_instruction": "x"}')
    with pytest.raises(ValueError, match="score_2"):
        ScoreLine().from_json('{"score_1": 3, "explanation": "x"}')
    with pytest.raises(ValueError, match="rank"):
        RankingAnswer(2).from_json('{"reference_response": "x", "scores": [1, 2, 3]}')


def test_json_schemas_are_strict_objects_and_unbounded_form_has_no_length_keywords():
    for shape in SHAPES:
        schema = shape.json_schema()
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert schema["required"] == list(schema["properties"])
        loose = json.dumps(shape.json_schema(bounded=False))
        assert "maxLength" not in loose and "minLength" not in loose and "maximum" not in loose


def test_bad_shapes_fail_at_construction():
    with pytest.raises(ValueError, match="marker"):
        Field("New [Answer]")
    with pytest.raises(ValueError, match="max_chars"):
        Field("New Answer", max_chars=0)
    with pytest.raises(ValueError, match="distinct"):
        MarkedFields((Field("New Answer"), Field("New  Answer")))
    with pytest.raises(ValueError, match="answer_format"):
        shape_from_dict({"kind": "poem"})


def test_chat_request_answer_format_keeps_plain_keys_and_enters_the_key_when_set():
    messages = [{"role": "user", "content": "Hi"}]
    plain = ChatRequest(messages, max_tokens=8)
    assert "answer_format" not in plain.to_dict()
    shaped = ChatRequest(messages, max_tokens=8, answer_format=RESPONSE)
    assert shaped.to_dict()["answer_format"] == RESPONSE.to_dict()
    assert shaped.key("m") != plain.key("m")
    assert ChatRequest(messages, max_tokens=8, answer_format=RESPONSE.to_dict()) == shaped
    assert hash(shaped) == hash(ChatRequest(messages, max_tokens=8, answer_format=RESPONSE))
    with pytest.raises(ValueError, match="answer_format"):
        ChatRequest(messages, answer_format="json")


def test_plain_cache_key_is_unchanged_by_the_new_field():
    from reflectune_hf.utils import stable_hash

    request = ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=8, seed=3)
    before = {"messages": [{"content": "Hi", "role": "user"}], "temperature": 0.0, "top_p": 1.0, "max_tokens": 8,
              "n": 1, "logprobs": False, "top_logprobs": None, "seed": 3}
    assert request.key("m", "http://h/v1") == stable_hash({"model": "m", "base_url": "http://h/v1",
                                                           "request": before}, length=64)


def test_gbnf_grammars_parse_in_llama_cpp():
    """llama.cpp's own grammar parser (the one its server runs) accepts every shape's grammar."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from reflectune_hf.models import gguf_path

    llm = llama_cpp.Llama(model_path=str(gguf_path("smollm2-135m-instruct")), vocab_only=True, verbose=False)

    def parses(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    assert not parses("root ::= [^\\[ broken")  # the check can fail
    for shape in SHAPES + [RankingAnswer(1, 0, 50), MarkedFields((Field("Better Answer", 1),))]:
        assert parses(shape.gbnf()), shape.gbnf()


def test_from_json_refuses_values_holding_marker_text_and_unwraps_a_fields_own_markers():
    # A value holding another marker or an [End] gave marker text that parsed `ok` to another answer.
    crossed = {"analysis": "a", "new_instruction": "Q [New Answer] wrong [End]", "new_answer": "B"}
    for data in (crossed, {**INSTRUCTION_JSON, "new_answer": "A [End] B"},
                 {**INSTRUCTION_JSON, "analysis": "Draft: **[New Instruction]** Other. [End]"}):
        with pytest.raises(ValueError, match="marker text"):
            INSTRUCTION.from_json(json.dumps(data))
    # The format's own markers around a value (the prompt's format, followed inside JSON) are dropped.
    wrapped = {"analysis": "a", "new_instruction": "[New Instruction] Do X. [End]", "new_answer": "[New Answer]: Y."}
    text = INSTRUCTION.from_json(json.dumps(wrapped))
    assert text == "a\n[New Instruction] Do X. [End]\n[New Answer] Y. [End]" and re.fullmatch(INSTRUCTION.regex(), text)
    assert INSTRUCTION.from_json(json.dumps(INSTRUCTION_JSON)).count("arr[0]") == 2  # brackets that open no marker
