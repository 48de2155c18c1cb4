"""The oracle stages: prompts sent, statuses, re-asks, per-row oracle errors, ids, batching,
fingerprints across processes and datasets' cache, and a property test on random strings.

The oracle here is tests/scripted_oracle.py (deterministic canned answers); the same stages run
against the real llama.cpp server in tests/test_variants_server.py.
"""

from __future__ import annotations

import json
from collections import Counter
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflectune_hf.data import ColumnError
from reflectune_hf.reflection.extract import STATUSES, extract_instruction_reflection, extract_response_reflection
from reflectune_hf.oracles.base import ChatResult
from reflectune_hf.prompts import get_prompt_set
from reflectune_hf.reflection.stages import COMPRESS_STATUSES, CompressInstruction, ReflectInstruction, ReflectResponse, map_stage, merge_input

from scripted_oracle import GOOD_COMPRESS, GOOD_INSTRUCTION, GOOD_RESPONSE, ScriptedOracle, demo_oracle
from test_prompts import _python_blocks, _reference_text, _section, _systems

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _rows(**columns):
    n = len(next(iter(columns.values())))
    return {"id": list(range(n)), **columns}


def _run(script: str) -> str:
    """Run a Python script in a new process with this checkout and the tests on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


# --- prompts -------------------------------------------------------------------------------------


def test_stage_requests_equal_reference_prompts():
    text = _reference_text()
    (ins,) = _python_blocks(_section(text, 3))
    res, res_input = _python_blocks(_section(text, 4))
    ins_system, = _systems(_section(text, 3))
    res_system, res_input_system = _systems(_section(text, 4))
    oracle = demo_oracle()
    batch = _rows(instruction=["Sort these.", "Name a colour."], input=["3, 1, 2", ""], output=["1, 2, 3", "Blue"])
    ReflectResponse(oracle)(batch)
    ReflectInstruction(oracle)(_rows(instruction=["Name a colour."], output=["Blue"]))
    with_input, without_input, instruction = [r.message_dicts for r in oracle.requests]
    assert with_input == [
        {"role": "system", "content": res_input_system},
        {"role": "user", "content": res_input["template"].format(
            ins="Sort these.", inp="3, 1, 2", outp="1, 2, 3", criteria=res_input["CRITERIA_RES_INPUT"])},
    ]
    assert without_input == [
        {"role": "system", "content": res_system},
        {"role": "user", "content": res["template"].format(ins="Name a colour.", outp="Blue", criteria=res["CRITERIA_RES"])},
    ]
    assert instruction == [
        {"role": "system", "content": ins_system},
        {"role": "user", "content": ins["template"].format(ins="Name a colour.", outp="Blue", criteria=ins["CRITERIA_INS"])},
    ]
    # The reference's call settings: temperature 0.0, top_p 1.0, max tokens 2048.
    assert {(r.temperature, r.top_p, r.max_tokens, r.seed) for r in oracle.requests} == {(0.0, 1.0, 2048, None)}


def test_stages_send_the_chosen_prompt_set_stripped():
    oracle = demo_oracle()
    ReflectInstruction(oracle, prompt_set="clean")(_rows(instruction=["  Hi \n"], output=[" Hello "]))
    CompressInstruction(oracle)(_rows(instruction=[" Translate. "], input=[" Bonjour "]))
    assert oracle.requests[0].message_dicts == get_prompt_set("clean").instruction_messages("Hi", "Hello")
    assert oracle.requests[1].message_dicts == get_prompt_set("paper").compress_messages("Translate.", "Bonjour")


# --- CompressInstruction -----------------------------------------------------------------------


def test_a_compression_that_echoes_the_prompt_frame_is_not_ok():
    """The oracle echoed the prompt: "[New Instruction] Sort: [The Start of Input] 3, 1 [The End of
    Input]": "[The End of Input]" ended the field and "Sort: [The Start of Input] 3, 1" was `ok`."""
    echo = "[New Instruction] Sort the list: [The Start of Input]\n3, 1\n\n[The End of Input] [End]"
    oracle = ScriptedOracle(rules=(("ROW-ECHO", (echo, echo)),))
    out = CompressInstruction(oracle)(_rows(instruction=["ROW-ECHO sort"], input=["3, 1"], output=["1, 3"]))
    assert out["compress_status"] == ["fallback_merged"] and out["instruction"] == ["ROW-ECHO sort\n\n3, 1"]
    from reflectune_hf.reflection.extract import parse_instruction_reflection

    assert parse_instruction_reflection("[New Instruction] [Instruction] Sort. [End]\n[New Answer] 1, 3 [End]") == (
        None, "1, 3")


def test_compress_statuses_never_lose_the_input():
    oracle = ScriptedOracle(rules=(
        ("ROW-OK", (GOOD_COMPRESS.format(topic="Sum 1 and 2"),)),
        ("ROW-BAD", ("Sure! Here you go.", "[New Instruction] your instruction [End]")),
        ("ROW-ERR", ("!error APITimeoutError: timed out",)),
        ("ROW-RETRY", ("no markers at all", GOOD_COMPRESS.format(topic="Retried with x"))),
    ))
    batch = _rows(
        instruction=["ROW-OK add", "ROW-NONE say hi", "ROW-BAD sort", "ROW-ERR count", "ROW-RETRY go"],
        input=["1, 2", "  ", "3, 1", "a b c", "x"],
        output=["3", "hi", "1, 3", "3", "y"],
    )
    out = CompressInstruction(oracle)(batch)
    assert out["compress_status"] == ["ok", "no_input", "fallback_merged", "oracle_error", "ok"]
    assert set(out["compress_status"]) <= set(COMPRESS_STATUSES)
    assert out["instruction"] == [
        "Sum 1 and 2, using the given input.", "ROW-NONE say hi", "ROW-BAD sort\n\n3, 1", "ROW-ERR count\n\na b c",
        "Retried with x, using the given input.",
    ]
    assert out["input"] == [""] * 5
    assert out["compress_error"] == ["", "", "", "APITimeoutError: timed out", ""]
    assert out["compress_raw"][1] == "" and out["compress_raw"][2] == "Sure! Here you go."
    assert out["original_instruction"] == batch["instruction"] and out["original_input"] == batch["input"]
    # No call for the row without input; one re-ask call for the two unparsable answers.
    assert oracle.calls == 2 and len(oracle.requests) == 4 + 2
    assert "output" not in out  # untouched columns are kept by map


def test_compress_keeps_existing_original_columns():
    batch = _rows(instruction=["a"], input=[""], original_instruction=["A0"], original_input=["I0"])
    out = CompressInstruction(demo_oracle())(batch)
    assert "original_instruction" not in out and "original_input" not in out


def test_merge_input_is_lossless():
    assert merge_input("Sort.", "") == "Sort." and merge_input("", " x ") == "x"
    assert merge_input("Sort: ", "3, 1\n2") == "Sort:\n\n3, 1\n2"


# --- ReflectInstruction / ReflectResponse ------------------------------------------------------


def test_reflect_instruction_refusal_names_the_row_under_a_numpy_or_torch_format():
    # `batch.get("id") or indices` asked an array for its truth value: a ValueError deep inside instead.
    ds = Dataset.from_dict({"id": [5, 6], "instruction": ["a", "b"], "output": ["c", "d"], "input": ["", "x"]})
    for fmt in ("numpy", "torch"):
        with pytest.raises(ColumnError, match="1 row.* non-empty 'input' \\(first id .*6"):
            ds.with_format(fmt).map(ReflectInstruction(demo_oracle()), batched=True)


def test_reflect_instruction_refuses_input_unless_merged():
    batch = {"id": [10, 11], "instruction": ["Sort.", "Hi"], "input": ["", "3, 1"], "output": ["1, 3", "Hello"]}
    with pytest.raises(ColumnError, match=r"1 row\(s\).*first id 11.*CompressInstruction.*merge_input=True"):
        ReflectInstruction(demo_oracle())(batch)
    oracle = demo_oracle()
    out = ReflectInstruction(oracle, merge_input=True)(batch)
    assert out["instruction"] == ["Sort.", "Hi\n\n3, 1"] and out["input"] == ["", ""]
    assert "Hi\n\n3, 1" in oracle.requests[1].message_dicts[1]["content"]


def test_reask_is_a_distinct_request_and_keeps_the_best_answer():
    oracle = ScriptedOracle(rules=(
        ("FIRST-OK", (GOOD_INSTRUCTION.format(topic="a"),)),
        ("RETRY-OK", ("nothing useful", GOOD_INSTRUCTION.format(topic="b"))),
        ("RETRY-PARTIAL", ("[New Instruction] Only an instruction. [End]", "still nothing")),
        ("RETRY-ERR", ("nothing useful", "!error server busy")),
    ))
    stage = ReflectInstruction(oracle)
    out = stage(_rows(instruction=["FIRST-OK", "RETRY-OK", "RETRY-PARTIAL", "RETRY-ERR"], output=["o"] * 4))
    assert out["reflection_attempts"] == [1, 2, 2, 2]
    assert out["reflection_raw"] == [
        GOOD_INSTRUCTION.format(topic="a"), GOOD_INSTRUCTION.format(topic="b"),
        "[New Instruction] Only an instruction. [End]", "nothing useful",
    ]
    # A failed re-ask keeps the first answer in `reflection_raw` but is an error: the row was
    # still owed an answer, so it is `oracle_error` and a rerun asks again (it was a frozen `failed`).
    assert out["reflection_error"][:3] == ["", "", ""] and "server busy" in out["reflection_error"][3]
    assert out["reflection_finish_reason"] == ["stop"] * 4
    first, retry = oracle.requests[1], oracle.requests[4]
    assert first.message_dicts == retry.message_dicts
    assert (first.seed, first.temperature, retry.seed, retry.temperature) == (None, 0.0, 1, 0.7)
    assert first.key("m", "http://x/v1") != retry.key("m", "http://x/v1")  # not served by the oracle cache
    extracted = extract_instruction_reflection({**_rows(instruction=["i"] * 4, output=["o"] * 4), **out})
    assert extracted["reflection_status"] == ["ok", "ok", "output_fallback", "oracle_error"]

    no_retry = ScriptedOracle(rules=oracle.rules)
    out = ReflectInstruction(no_retry, format_retries=0, seed=7)(_rows(instruction=["RETRY-OK"], output=["o"]))
    assert out["reflection_attempts"] == [1] and len(no_retry.requests) == 1 and no_retry.requests[0].seed == 7


def test_response_reask_on_zero_or_several_distinct_better_answers():
    # REFERENCE.md §5: zero or several [Better Answer] segments trigger one re-query; then the
    # original is kept. Two identical segments are one answer: no re-ask.
    two = "[Better Answer] The vaquita. [End]\n[Better Answer] The Amur leopard. [End]"
    same = "[Better Answer] The vaquita. [End]\nAgain: [Better Answer] The vaquita. [End]"
    oracle = ScriptedOracle(rules=(
        ("ROW-ZERO", ("The answer is wrong, dogs are not endangered.", GOOD_RESPONSE.format(topic="zero"))),
        ("ROW-SEVERAL", (two, GOOD_RESPONSE.format(topic="several"))),
        ("ROW-SAME", (same, "never asked")),
        ("ROW-STILL-BAD", ("no marker at all", two)),
    ))
    rows = _rows(instruction=["ROW-ZERO", "ROW-SEVERAL", "ROW-SAME", "ROW-STILL-BAD"], output=["Dog."] * 4)
    out = ReflectResponse(oracle)(rows)
    assert out["reflection_attempts"] == [2, 2, 1, 2] and oracle.calls == 2
    assert out["reflection_raw"] == [GOOD_RESPONSE.format(topic="zero"), GOOD_RESPONSE.format(topic="several"),
                                     same, "no marker at all"]  # a tie keeps the first answer
    first, retries = oracle.requests[:4], oracle.requests[4:]
    asked_again = [r for r in first if "ROW-SAME" not in r.message_dicts[1]["content"]]
    assert [r.message_dicts for r in retries] == [r.message_dicts for r in asked_again]
    assert {(r.seed, r.temperature) for r in retries} == {(1, 0.7)}
    assert all(a.key("m") != b.key("m") for a, b in zip(asked_again, retries))  # distinct: not served by the cache
    extracted = extract_response_reflection({**rows, **out})
    assert extracted["reflection_status"] == ["ok", "ok", "ok", "failed"]
    assert extracted["output"] == ["A detailed answer about zero.", "A detailed answer about several.",
                                   "The vaquita.", "Dog."]

    once = ScriptedOracle(rules=oracle.rules)
    out = ReflectResponse(once, format_retries=0)(rows)
    assert out["reflection_attempts"] == [1] * 4 and once.calls == 1 and out["reflection_raw"][1] == two


def test_oracle_errors_are_recorded_per_row_without_reask():
    oracle = ScriptedOracle(rules=(("BROKEN", ("!error APIConnectionError: refused",)),),
                            default=(GOOD_RESPONSE.format(topic="x"),))
    out = ReflectResponse(oracle)(_rows(instruction=["fine", "BROKEN", "fine too"], output=["a", "b", "c"]))
    assert out["reflection_error"] == ["", "APIConnectionError: refused", ""]
    assert out["reflection_raw"][1] == "" and out["reflection_attempts"] == [1, 1, 1]
    assert oracle.calls == 1
    batch = {**_rows(instruction=["fine", "BROKEN", "fine too"], output=["a", "b", "c"]), **out}
    extracted = extract_response_reflection(batch)
    assert extracted["reflection_status"] == ["ok", "oracle_error", "ok"] and extracted["output"][1] == "b"


def test_response_prompt_follows_each_rows_input():
    oracle = demo_oracle()
    ReflectResponse(oracle)(_rows(instruction=["a", "b", "c"], input=["x", "", None], output=["1", "2", "3"]))
    systems = [r.message_dicts[0]["content"] for r in oracle.requests]
    paper = get_prompt_set("paper")
    assert systems == [paper.response_input_system, paper.response_system, paper.response_system]


def test_one_complete_call_per_map_batch_and_rows_kept():
    oracle = demo_oracle()
    ds = Dataset.from_dict(_rows(instruction=[f"q{i}" for i in range(5)], output=[f"a{i}" for i in range(5)]))
    out = ds.map(ReflectResponse(oracle), batched=True, batch_size=2).map(extract_response_reflection, batched=True)
    assert oracle.calls == 3 and len(out) == 5 and list(out["id"]) == list(range(5))
    assert set(out["reflection_status"]) == {"ok"}


def test_ids_are_optional_or_taken_from_indices():
    # Issue #16.8: ids only align variants; a stage alone works on plain Alpaca rows and adds none.
    out = ReflectResponse(demo_oracle())({"instruction": ["a"], "output": ["b"]})
    assert "id" not in out and out["reflection_error"] == [""]
    ds = Dataset.from_dict({"instruction": ["a", "b"], "output": ["c", "d"]})
    assert "id" not in map_stage(ds, ReflectResponse(demo_oracle())).column_names
    out = ds.map(ReflectResponse(demo_oracle()), batched=True, with_indices=True)
    assert list(out["id"]) == [0, 1]


def test_a_map_without_batched_is_refused_not_split_into_characters():
    # `ds.map(stage)` passes one example (strings, an int index): it was read as a batch of characters,
    # writing list columns and a row's output as a list of its characters with 4 `failed` statuses.
    ds = Dataset.from_dict({"instruction": ["abcd"], "output": ["wxyz"]})
    for function in (ReflectResponse(demo_oracle()), CompressInstruction(demo_oracle())):
        with pytest.raises(ColumnError, match="batched=True"):
            function({"instruction": "abcd", "input": "x", "output": "wxyz"}, 0)
    with pytest.raises(ColumnError, match="not a batch: map this function with batched=True"):
        ds.map(lambda row: {"reflection_raw": "[Better Answer] x [End]"}).map(extract_response_reflection)
    with pytest.raises(TypeError, match="got list: map a stage with batched=True, without input_columns"):
        ds.map(ReflectResponse(demo_oracle()), batched=True, input_columns=["instruction", "output"])
    for fmt in ("pandas", "arrow"):  # an arrow batch failed deep inside ('Table' object has no attribute 'items')
        with pytest.raises(TypeError, match="got (DataFrame|Table): .*without a pandas or arrow format"):
            ds.with_format(fmt).map(ReflectResponse(demo_oracle()), batched=True)


def test_configuration_and_oracle_contract_errors():
    with pytest.raises(TypeError, match="complete"):
        ReflectResponse(object())
    with pytest.raises(ValueError, match="format_retries"):
        ReflectResponse(demo_oracle(), format_retries=-1)
    with pytest.raises(ValueError, match="paper"):
        ReflectResponse(demo_oracle(), prompt_set="nope")
    with pytest.raises(ColumnError, match=r"ReflectResponse needs the column\(s\) \['output'\]"):
        ReflectResponse(demo_oracle())({"id": [0], "instruction": ["a"]})

    class Short:
        def complete(self, requests):
            return [ChatResult(texts=["x"])][: len(requests) - 1]

    with pytest.raises(RuntimeError, match="1 results for 2 requests|0 results for 1 requests"):
        ReflectResponse(Short())(_rows(instruction=["a"], output=["b"]))


def test_usage_is_counted_but_not_pickled():
    stage = ReflectResponse(demo_oracle())
    before = Hasher.hash(stage)
    stage(_rows(instruction=["a", "b"], output=["c", "d"]))
    assert stage.usage["prompt_tokens"] == 20 and stage.oracle.calls == 1
    assert Hasher.hash(stage) == before
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.usage is None and clone.oracle.requests is None and clone == stage


# --- fingerprints and datasets' cache ------------------------------------------------------------

STAGE_CONFIGS = """
from reflectune_hf.reflection.stages import CompressInstruction, ReflectInstruction, ReflectResponse
from scripted_oracle import demo_oracle
STAGES = [
    ReflectInstruction(demo_oracle()), ReflectInstruction(demo_oracle("other-model")),
    ReflectInstruction(demo_oracle(), prompt_set="clean"), ReflectInstruction(demo_oracle(), temperature=0.1),
    ReflectInstruction(demo_oracle(), merge_input=True), ReflectResponse(demo_oracle()),
    ReflectResponse(demo_oracle(), max_tokens=64), CompressInstruction(demo_oracle()),
]
"""


def test_fingerprints_are_stable_across_processes_and_follow_the_configuration():
    scope: dict = {}
    exec(STAGE_CONFIGS, scope)
    here = [Hasher.hash(stage) for stage in scope["STAGES"]]
    there = json.loads(_run(STAGE_CONFIGS + "from datasets.fingerprint import Hasher\n"
                                            "import json; print(json.dumps([Hasher.hash(s) for s in STAGES]))"))
    assert here == there
    assert len(set(here)) == len(here)  # model, prompt set, sampling, options and stage all count


def test_second_map_in_a_new_process_calls_no_oracle(tmp_path):
    Dataset.from_dict(_rows(instruction=["q1", "q2", "q3"], output=["a1", "a2", "a3"])).save_to_disk(tmp_path / "ds")
    ds = load_from_disk(str(tmp_path / "ds"))
    oracle = demo_oracle()
    first = ds.map(ReflectResponse(oracle), batched=True)
    assert len(oracle.requests) == 3
    script = (
        "from datasets import load_from_disk\nfrom reflectune_hf.reflection.stages import ReflectResponse\n"
        "from scripted_oracle import demo_oracle\nimport json\n"
        f"oracle = demo_oracle()\nout = load_from_disk({str(tmp_path / 'ds')!r}).map(ReflectResponse(oracle), batched=True)\n"
        "print(json.dumps([len(oracle.requests or []), list(out['reflection_raw'])]))"
    )
    requests, raws = json.loads(_run(script))
    assert requests == 0 and raws == list(first["reflection_raw"])


# --- property: random strings never crash a stage nor change the row count ----------------------

_text = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["", " ", "[End]", "N/A", "\n\n3."]))
_answer = st.one_of(
    st.text(max_size=80),
    st.builds("[New Instruction]{}[End]\n[New Answer]{}".format, st.text(max_size=30), st.text(max_size=30)),
    st.builds("**[Better Answer]**: {} [End] {}".format, st.text(max_size=30), st.text(max_size=30)),
    st.text(max_size=20).map(lambda s: "!error " + s),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(_text, _text, _text), min_size=0, max_size=5), answers=st.lists(_answer, min_size=1, max_size=4))
def test_random_strings_never_crash_a_stage(rows, answers):
    n = len(rows)
    batch = _rows(instruction=[r[0] for r in rows], input=[r[1] for r in rows], output=[r[2] for r in rows]) if rows else {
        "id": [], "instruction": [], "input": [], "output": []}
    oracle = ScriptedOracle(default=tuple(answers))
    compressed = {**batch, **CompressInstruction(oracle)(batch)}
    assert all(len(v) == n for v in compressed.values())
    assert set(compressed["compress_status"]) <= set(COMPRESS_STATUSES)
    for stage, extract in ((ReflectInstruction(oracle, merge_input=True), extract_instruction_reflection),
                           (ReflectResponse(oracle), extract_response_reflection)):
        for source in (batch, compressed):
            reflected = {**source, **stage(source)}
            out = {**reflected, **extract(reflected)}
            assert all(len(v) == n for v in out.values())
            assert set(out["reflection_status"]) <= set(STATUSES)
            written = extract(reflected)
            assert all(isinstance(x, str) for column in written.values() for x in column)
    has_input = any((r[1] or "").strip() for r in rows)
    try:
        ReflectInstruction(oracle)(batch)
        assert not has_input
    except ColumnError as error:
        assert has_input and "CompressInstruction" in str(error)


# --- rows that get no request, lost inputs, truncated answers (issue #16) -----------------------


def test_empty_rows_get_no_request_and_say_why():
    # Issue #16.4: an empty, None or blank instruction/output is never sent, never called ok.
    oracle = demo_oracle()
    batch = _rows(instruction=["Name a bird.", "", None, "Hi"], input=["", "", "", ""], output=["Cat.", "x", "y", " \n"])
    for stage, extract in ((ReflectResponse(oracle), extract_response_reflection),
                           (ReflectInstruction(oracle), extract_instruction_reflection)):
        oracle.requests = None
        out = stage(batch)
        assert len(oracle.requests) == 1 and out["reflection_attempts"] == [1, 0, 0, 0]
        extracted = extract({**batch, **out})
        assert extracted["reflection_status"] == ["ok", "empty_input", "empty_input", "empty_input"]
        assert extracted["output"][1:] == ["x", "y", " \n"]  # rows kept unchanged
    oracle.requests = None
    out = CompressInstruction(oracle)(_rows(instruction=["", "Say hi.", " "], input=["Good morning", "Hello", ""]))
    assert [r.seed for r in oracle.requests] == [None, 1]  # one row sent (its answer drops the input: re-asked)
    assert out["compress_status"] == ["empty_input", "input_lost", "no_input"]
    assert out["instruction"][0] == "Good morning" and out["input"] == ["", "", ""]  # the input is kept, merged


def test_build_variants_sends_nothing_for_an_empty_output():
    from reflectune_hf.reflection.variants import build_variants

    oracle = demo_oracle()
    ds = Dataset.from_dict({"instruction": ["Name a bird.", "Say hi."], "input": ["", ""], "output": ["Cat.", "  "]})
    variants = build_variants(ds, oracle)
    assert not any("Say hi." in r.message_dicts[1]["content"] for r in oracle.requests)
    for split in ("reflect_instruction", "reflect_response", "reflect_both"):
        assert variants[split][1]["reflection_status"] == "empty_input" and variants[split][1]["output"] == "  "


def test_lone_surrogate_flags_its_row_and_the_batch_proceeds():
    # Issue #16.9b: text that is not valid UTF-8 reaches a stage through Python batches (Arrow
    # refuses it): that row gets no request and `invalid_text`; a real oracle answers the others.
    from reflectune_hf.oracles import OpenAIOracle
    from loopback import LoopbackServer

    batch = _rows(instruction=["Name a bird \ud800.", "Name a star.", "Sort."], input=["", "", "3, 1\udfff"],
                  output=["Cat.", "Sun", "1, 3"])
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, max_retries=0)
        out = ReflectResponse(oracle)(batch)
        assert len(server.chat_requests) == 1 + 1  # the valid row and its re-ask (an echo does not parse)
        assert extract_response_reflection({**batch, **out})["reflection_status"] == ["invalid_text", "failed",
                                                                                      "invalid_text"]
        compressed = CompressInstruction(oracle)(batch)
        assert compressed["compress_status"] == ["invalid_text", "no_input", "invalid_text"]
        assert len(server.chat_requests) == 2


def test_a_compression_that_drops_the_input_falls_back_to_the_merge():
    # Issue #16.5: "Translate the sentence." for a row whose input is the sentence loses it.
    oracle = ScriptedOracle(rules=(
        ("LOSES", ("[New Instruction] Translate the sentence. [End]",)),
        ("KEEPS", ("[New Instruction] Translate the sentence. [End]", "[New Instruction] Translate 'The quick "
                   "brown fox jumps over the lazy dog' to French. [End]")),
    ))
    sentence = "The quick brown fox jumps over the lazy dog."
    batch = _rows(instruction=["LOSES Translate to French.", "KEEPS Translate to French."], input=[sentence] * 2)
    out = CompressInstruction(oracle)(batch)
    assert out["compress_status"] == ["input_lost", "ok"]  # an answer that loses the input is re-asked
    assert out["instruction"][0] == f"LOSES Translate to French.\n\n{sentence}"
    assert out["compress_raw"][0] == "[New Instruction] Translate the sentence. [End]"


def test_input_rule_passes_real_compressions(shared_data):
    # The published compression of the method (cherry_alpaca_5_percent_compressed.json, rows
    # matched by output): nearly all keep their input by the rule; what fails is a real loss.
    from reflectune_hf.reflection.row_checks import input_survives

    rows = json.loads((shared_data / "cherry_alpaca_5_percent.json").read_text())
    compressed = {r["output"]: r["instruction"] for r in
                  json.loads((shared_data / "cherry_alpaca_5_percent_compressed.json").read_text())}
    pairs = [(r["input"], compressed[r["output"]]) for r in rows if r.get("input", "").strip() and r["output"] in compressed]
    kept = sum(input_survives(inp, ins) for inp, ins in pairs)
    assert len(pairs) == 579 and kept == 510
    good = {"Expectant Mothers": "Design a wellness plan for expectant mothers.",
            "Topic: Time Management": "Write an essay about time management.",
            "profession: Nurse": "What are the benefits of joining the nursing profession?",
            'str1 = "abcdef"\nstr2 = "abcxyz"': 'Given two strings, "abcdef" and "abcxyz", find and return the longest '
                                                 'common substring.'}
    assert all(input_survives(inp, ins) for inp, ins in good.items())
    assert not input_survives("https://www.nytimes.com/2021/02/11/business/tesla-stock-elon-musk.html",
                              "Write a compelling summary in 5 sentences of the article.")


def test_truncated_answers_are_reasked_and_never_ok():
    # Issue #16.6: an answer cut by the token limit parses, but it is not complete.
    cut_response = "!length 1. Short.\n2. [Better Answer] The Amur leopard is critically"
    oracle = ScriptedOracle(rules=(
        ("RES-CUT-THEN-OK", (cut_response, GOOD_RESPONSE.format(topic="cats"))),
        ("RES-CUT", (cut_response,)),
        ("INS-CUT", ("!length " + GOOD_INSTRUCTION.format(topic="x")[:-30],)),
        ("COMP-CUT", ("!length [New Instruction] Translate 'Good morning' to Fr",)),
    ))
    rows = _rows(instruction=["RES-CUT-THEN-OK", "RES-CUT"], output=["Dog.", "Dog."])
    out = ReflectResponse(oracle)(rows)
    assert out["reflection_attempts"] == [2, 2] and out["reflection_finish_reason"] == ["stop", "length"]
    extracted = extract_response_reflection({**rows, **out})
    assert extracted["reflection_status"] == ["ok", "truncated"] and extracted["output"] == ["A detailed answer about cats.",
                                                                                         "Dog."]
    assert out["reflection_raw"][1] == cut_response[len("!length "):]  # the raw text is kept
    assert [r.max_tokens for r in oracle.requests] == [2048, 2048, 4096, 4096]  # the re-ask may say more
    rows = _rows(instruction=["INS-CUT"], output=["o"])
    out = ReflectInstruction(oracle)(rows)
    assert out["reflection_attempts"] == [2]
    assert extract_instruction_reflection({**rows, **out})["reflection_status"] == ["truncated"]
    out = CompressInstruction(oracle)(_rows(instruction=["COMP-CUT Translate."], input=["Good morning"]))
    assert out["compress_status"] == ["truncated"] and out["instruction"] == ["COMP-CUT Translate.\n\nGood morning"]


def test_an_answer_stopped_by_a_content_filter_is_reasked_and_never_ok():
    # finish_reason "content_filter" keeps the text written before the filter cut it: it parsed as `ok`.
    class Filtered:
        def complete(self, requests):
            text = "[New Instruction] Translate Good morning to" if "editor" in str(requests[0].messages) else \
                "[New Instruction] Name a bird. [End]\n[New Answer] Robin, a"
            return [ChatResult(texts=[text], finish_reasons=["content_filter"]) for _ in requests]

    rows = _rows(instruction=["Name a bird."], output=["Cat."])
    out = ReflectInstruction(Filtered())(rows)
    assert out["reflection_attempts"] == [2] and out["reflection_finish_reason"] == ["content_filter"]
    extracted = extract_instruction_reflection({**rows, **out})
    assert extracted["reflection_status"] == ["truncated"] and extracted["output"] == ["Cat."]
    out = CompressInstruction(Filtered())(_rows(instruction=["Translate."], input=["Good morning"]))
    assert out["compress_status"] == ["truncated"] and out["instruction"] == ["Translate.\n\nGood morning"]


def test_a_stage_alone_runs_on_plain_and_streaming_alpaca_rows(tmp_path):
    # Issue #16.8: no id column needed, streaming or not.
    from datasets import load_dataset

    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n" for i in range(3)))
    for streaming in (False, True):
        ds = load_dataset("json", data_files=str(path), split="train", streaming=streaming)
        out = map_stage(ds, ReflectResponse(demo_oracle())).map(extract_response_reflection, batched=True)
        rows = list(out)
        assert [r["reflection_status"] for r in rows] == ["ok"] * 3 and all("id" not in r for r in rows)


def test_estimate_builds_the_requests_the_stages_send():
    # Issue #16.9d: one request builder (`stage.requests`), so the estimate's requests are the
    # stages' first attempts (same cache keys: stripped texts, inputs merged, empty rows left out).
    from reflectune_hf.cli.jobs import ReflectConfig, estimate_requests, reflect

    ds = Dataset.from_dict({"instruction": [" Sort: ", "Name a star.", "Say hi.", "Add."],
                            "input": ["3, 1, 2 ", "", "", "2, 2"], "output": ["1, 2, 3", " Sun ", "", "4"]})
    for compress in (True, False):
        config = ReflectConfig(oracle_model="scripted", compress=compress, max_new_tokens=64, format_retries=0)
        oracle = demo_oracle()
        reflect(config, data=ds, oracle=oracle)
        requests, stand_ins = estimate_requests(config, ds)
        sent = Counter(r.key("m") for r in oracle.requests)
        estimated = Counter(r.key("m") for r in requests)
        # Sent beyond the estimate: only the reflect_both requests, whose reflected instructions
        # the estimate cannot know (it counts the origin's response requests as their stand-ins).
        both = [r for r in oracle.requests if "Explain it in three steps." in r.message_dicts[1]["content"]]
        assert not estimated - sent and sent - estimated == Counter(r.key("m") for r in both)
        assert len(both) == len(stand_ins) == 3  # the row with an empty output sends nothing
