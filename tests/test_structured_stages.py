"""The stages state their answer shape (prompts unchanged), and the measured format rate: the
`format_outcome` column of every reflected split, `summarize`, the card and the closing table."""

from __future__ import annotations

import pytest
from datasets import Dataset
from scripted_oracle import ScriptedOracle

from reflectune_hf.evaluation.stages import PairwiseJudge
from reflectune_hf.oracles.stage_formats import stage_answer_format
from reflectune_hf.oracles.structured import MarkedFields, RankingAnswer, ScoreLine
from reflectune_hf.reflection.stages import CompressInstruction, ReflectInstruction, ReflectResponse
from reflectune_hf.tuna.stages import ContextualRank

PAIR = {"id": [0], "instruction": ["Name a bird."], "input": [""], "output": ["Cat."]}


def first_request(stage, batch):
    oracle = stage.oracle
    stage(batch)
    return oracle.requests[0]


@pytest.mark.parametrize("make, kind, batch", [
    (lambda o, **k: ReflectInstruction(o, max_tokens=300, **k), "instruction", PAIR),
    (lambda o, **k: ReflectResponse(o, max_tokens=300, **k), "response", PAIR),
    (lambda o, **k: CompressInstruction(o, max_tokens=300, **k), "compress", {**PAIR, "input": ["Robins?"]}),
])
def test_reflection_stages_state_their_shape_and_keep_the_prompt(make, kind, batch):
    shaped = first_request(make(ScriptedOracle()), batch)
    plain = first_request(make(ScriptedOracle(), structured="off"), batch)
    assert shaped.answer_format == stage_answer_format(kind, 300) and isinstance(shaped.answer_format, MarkedFields)
    assert plain.answer_format is None
    assert shaped.messages == plain.messages  # the prompt is byte-identical
    assert first_request(make(ScriptedOracle(), structured=True), batch).answer_format == shaped.answer_format


def test_judge_and_ranking_state_their_shapes():
    judge = PairwiseJudge(ScriptedOracle(default=("8 7\nFine.",)), max_tokens=200)
    judge({"instruction": ["Q?"], "response_a": ["a"], "response_b": ["b"]})
    assert {r.answer_format for r in judge.oracle.requests} == {stage_answer_format("judge", 200)}
    assert isinstance(judge.oracle.requests[0].answer_format, ScoreLine)
    off = PairwiseJudge(ScriptedOracle(default=("8 7",)), structured="off")
    off({"instruction": ["Q?"], "response_a": ["a"], "response_b": ["b"]})
    assert off.oracle.requests[0].answer_format is None

    rank = ContextualRank(ScriptedOracle(default=("###Response 3:\nX\n\nrank: [3, 0]",)), max_tokens=500)
    out = rank({"id": [0], "instruction": ["Q?"], "responses": [["a", "b", "c"]]})
    shape = rank.oracle.requests[0].answer_format
    assert shape == stage_answer_format("ranking", 500, 3)
    assert isinstance(shape, RankingAnswer) and shape.num_responses == 3
    assert out["rank"] == [[3, 0]]


def test_bad_structured_values_fail_at_construction():
    with pytest.raises(ValueError, match="structured must be"):
        ReflectResponse(ScriptedOracle(), structured="sometimes")

    class OffOracle(ScriptedOracle):
        structured = "off"

    with pytest.raises(ValueError, match="oracle has structured='off'"):
        ReflectResponse(OffOracle(), structured="on")


def test_format_outcome_column_summarize_card_and_table(tmp_path):
    from reflectune_hf.publishing.card import build_card
    from reflectune_hf.cli.jobs import JobResult
    from reflectune_hf.publishing.report import format_rates, summarize
    from reflectune_hf.reflection.variants import build_variants

    bird, fish, cow = "[New Instruction] Name a bird. [End]\n[New Answer] Robin. [End]", "no format", "!error down"
    oracle = ScriptedOracle(rules=(
        ("Name a fish", ("no format at all", bird)),  # parsed after the re-ask
        ("Name a cow", (cow,)),                         # the oracle fails: no answer
        ("Name a dog", (fish, fish)),                   # never parsed: fallback
    ), default=(bird + "\n[Better Answer] Robin. [End]",))
    data = Dataset.from_dict({"instruction": ["Name a bird.", "Name a fish.", "Name a cow.", "Name a dog."],
                              "output": ["Cat.", "Cat.", "Cat.", "Cat."]})
    variants = build_variants(data, oracle, compress=False)
    assert list(variants["origin"]["format_outcome"]) == [""] * 4
    assert list(variants["reflect_instruction"]["format_outcome"]) == ["first_try", "after_reask", "none", "fallback"]
    rates = summarize(variants, oracle="scripted")["format_rates"]
    assert set(rates) == {"reflect_instruction", "reflect_response", "reflect_both"}
    assert rates["reflect_instruction"]["rows"] == 4 and rates["reflect_instruction"]["parsed"] == 0.5
    assert rates["reflect_instruction"]["oracle"] == "scripted"
    assert format_rates(variants) == {k: {**v, "oracle": None} for k, v in rates.items()}

    card = str(build_card(variants, {"oracle_model": "scripted"}))
    assert "### Answer format" in card
    assert "| `reflect_instruction` | scripted | 4 | 50.0% | 1 (25.0%) | 1 (25.0%) | 1 (25.0%) | 1 (25.0%) |" in card

    table = JobResult(variants, tmp_path, {k: 4 for k in variants}, {}, None, {}, 1.0, rates).table()
    assert "answer format" in table and "parsed 50.0% (first_try 1, after_reask 1, fallback 1, none 1)" in table


def test_cli_options_reach_the_oracle_and_the_stages():
    from reflectune_hf.cli.configs import RecycleConfig
    from reflectune_hf.cli.jobs import config_oracle as make_oracle

    config = RecycleConfig(oracle_model="m", base_url="http://127.0.0.1:9/v1", structured="on", backend="llama.cpp")
    oracle = make_oracle(config)
    assert (oracle.structured, oracle.backend) == ("on", "llamacpp")
    assert make_oracle(RecycleConfig(oracle_model="m", batch_api=True, structured="off")).structured == "off"
    # The local oracle gets the setting too (`--structured off` means free text there as well).
    assert make_oracle(RecycleConfig(oracle_model="local:smollm2-135m-instruct", structured="off")).structured == "off"
    with pytest.raises(ValueError, match="structured must be"):
        RecycleConfig(oracle_model="m", structured="always")
    with pytest.raises(ValueError, match="backend must be one of"):
        RecycleConfig(oracle_model="m", backend="tgi")


def test_a_field_ended_by_its_length_bound_is_cut_not_ok():
    """Under a shape the backend ends a field when it reaches `max_chars` and reports "stop"; the
    model did not end it, so the answer counts as cut by the length limit: re-asked with twice the
    budget, `truncated` when kept (found on the quickstart: instructions clipped at 100 characters
    mid-sentence were `ok`). A field that ends before its bound stays `ok`."""
    from reflectune_hf.oracles.stage_formats import fields_at_bound
    from reflectune_hf.reflection.extract import extract_instruction_reflection, extract_response_reflection

    first, longer = stage_answer_format("instruction", 60), stage_answer_format("instruction", 120)
    bound = first.fields[0].max_chars
    clipped = "[New Instruction] " + ("Name a bird that " * 9)[:bound] + " [End]\n[New Answer] A robin. [End]"
    fitting = "[New Instruction] Name a bird. [End]\n[New Answer] A robin. [End]"
    assert fields_at_bound(first, clipped) == ["New Instruction"] and fields_at_bound(first, fitting) == []
    unenforced = clipped.replace(("Name a bird that " * 9)[:bound], "Name a bird that sings at dawn in spring.")
    assert fields_at_bound(first, unenforced) == []  # longer than the bound: a backend that did not enforce it
    clipped_again = clipped.replace(("Name a bird that " * 9)[:bound], ("Name a bird that " * 9)[:longer.fields[0].max_chars])
    oracle = ScriptedOracle(rules=(("CUT-THEN-FITS", (clipped, fitting)), ("CUT-TWICE", (clipped, clipped_again))))
    rows = {"id": [0, 1], "instruction": ["CUT-THEN-FITS", "CUT-TWICE"], "input": ["", ""], "output": ["Cat.", "Cat."]}
    out = ReflectInstruction(oracle, max_tokens=60)(rows)
    assert out["reflection_attempts"] == [2, 2] and out["reflection_finish_reason"] == ["stop", "length"]
    assert [r.answer_format for r in oracle.requests] == [first, first, longer, longer]
    extracted = extract_instruction_reflection({**rows, **out})
    assert extracted["reflection_status"] == ["ok", "truncated"]
    assert extracted["instruction"] == ["Name a bird.", "CUT-TWICE"]

    cut_answers = tuple("[Better Answer] " + ("A robin sings. " * 40)[:stage_answer_format("response", m).fields[0].max_chars]
                        + " [End]" for m in (60, 120))
    oracle = ScriptedOracle(default=cut_answers)
    out = ReflectResponse(oracle, max_tokens=60)(PAIR)
    assert out["reflection_finish_reason"] == ["length"]
    assert extract_response_reflection({**PAIR, **out})["reflection_status"] == ["truncated"]
    plain = ReflectResponse(ScriptedOracle(default=cut_answers), max_tokens=60, structured="off")(PAIR)
    assert plain["reflection_finish_reason"] == ["stop"]  # no shape sent: no bound to reach


def test_a_field_opening_with_a_lower_case_y_is_cut_at_its_bound_too():
    """The regex's first unit of a field can hold up to 5 characters ("yes, " is "ye" then units,
    so as not to open with "your "): an enforced field opening with "y" is cut one to four
    characters past `max_chars`, and was `ok` with finish_reason "stop"."""
    import re

    from reflectune_hf.oracles.stage_formats import fields_at_bound
    from reflectune_hf.oracles.structured import Field, MarkedFields

    shape = MarkedFields((Field("Better Answer", 12),))
    for body in ("yes, robins s", "yours is a robin", "Yes, robins "):
        text = f"[Better Answer] {body} [End]"
        assert re.fullmatch(shape.regex(), text) and not re.fullmatch(shape.regex(), text.replace(" [End]", "x [End]"))
        assert fields_at_bound(shape, text) == ["Better Answer"], body
    assert fields_at_bound(shape, "[Better Answer] yes, robins [End]") == []
    assert fields_at_bound(shape, "[Better Answer] yes, robins! [End]") == ["Better Answer"]  # JSON, at maxLength

def test_a_json_value_cut_at_its_max_length_after_a_space_is_cut_not_ok():
    """vLLM's JSON format ends a value at maxLength; from_json stripped the trailing space, so the
    field looked shorter than its bound and the clipped instruction parsed `ok`."""
    import json

    from reflectune_hf.oracles.stage_formats import fields_at_bound
    from reflectune_hf.oracles.structured import Field, MarkedFields
    from reflectune_hf.reflection.extract import parse_instruction_reflection

    shape = MarkedFields((Field("New Instruction", 12), Field("New Answer", 40)), analysis_max_chars=5)
    text = shape.from_json(json.dumps({"analysis": "a", "new_instruction": "Name a bird ", "new_answer": "Robin. "}))
    assert fields_at_bound(shape, text) == ["New Instruction"]
    assert parse_instruction_reflection(text) == ("Name a bird", "Robin.")

def test_the_reask_log_line_says_how_many_answers_were_cut_and_how_many_did_not_parse(caplog):
    """The stages re-ask answers cut by a limit or a field's bound as well as unparsed ones; the
    log said "N answers that do not parse" for both (the quickstart's cut instructions read as
    format failures under a grammar that guarantees the format)."""
    first = stage_answer_format("instruction", 60)
    clipped = ("[New Instruction] " + ("Name a bird that " * 9)[:first.fields[0].max_chars]
               + " [End]\n[New Answer] A. [End]")
    rules = (("CUT", (clipped,)), ("JUNK", ("no markers at all",)), ("LONG", ("!length [New Instruction] Name",)))
    oracle = ScriptedOracle(rules=rules, default=("[New Instruction] Name a bird. [End]\n[New Answer] A robin. [End]",))
    rows = {"id": [0, 1, 2, 3], "instruction": ["CUT", "JUNK", "LONG", "FINE"], "input": [""] * 4, "output": ["C."] * 4}
    with caplog.at_level("INFO", logger="reflectune_hf"):
        ReflectInstruction(oracle, max_tokens=60)(rows)
    [line] = [r.getMessage() for r in caplog.records if "re-asking" in r.getMessage()]
    assert "re-asking 3 of 4 answers (2 cut by a length limit or a field's bound" in line
    assert "1 that do not parse" in line
