"""Evaluation stages: GenerateResponses and PairwiseJudge with a scripted oracle, load_eval_set on
small files and on the five public test sets, the eval script (REFERENCE.md §11)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import subprocess
import sys

import pytest
from datasets import Dataset
from datasets.fingerprint import Hasher

from reflectune_hf.data import ColumnError
from reflectune_hf.evaluation.stages import GenerateResponses, PairwiseJudge, judge_summary, load_eval_set
from reflectune_hf.oracles.base import ChatResult
from reflectune_hf.prompts import JUDGE_SYSTEM, judge_messages

from conftest import REPO

QUALITY = {"good": 9, "fair": 6, "poor": 3}


class ScriptedOracle:
    """A deterministic test double of the oracle protocol: canned answers keyed on the request.

    As an answering model: "fail" in the question gives an oracle error, "silent" a blank answer,
    "long" a truncated one; otherwise it echoes the question (after `word` when given). As a
    judge: each answer's score is QUALITY of its first word (+`bias` for the answer shown first);
    an answer containing "garble" gets prose without scores, "boom" an oracle error.
    """

    def __init__(self, bias: int = 0, record: bool = True, word: str = ""):
        self.bias = bias
        self.requests = [] if record else None
        self.word = word

    def complete(self, requests):
        if self.requests is not None:
            self.requests.extend(requests)
        return [self._answer(r) for r in requests]

    def _answer(self, request):
        user = request.message_dicts[-1]["content"]
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if user.startswith("[Question]"):
            answers = re.findall(r"\[The Start of Assistant \d's Answer\]\n(.*?)\n\n\[The End", user, re.S)
            if any("boom" in a for a in answers):
                return ChatResult.failure("HTTP 500 from judge")
            if any("garble" in a for a in answers):
                return ChatResult(texts=["Both assistants tried their best."], finish_reasons=["stop"], usage=usage)
            s1, s2 = (QUALITY[a.split()[0]] for a in answers)
            return ChatResult(texts=[f"{s1 + self.bias} {s2}\nExplanation."], finish_reasons=["stop"], usage=usage)
        if "fail" in user:
            return ChatResult.failure("connection reset")
        if "silent" in user:
            return ChatResult(texts=["  "], finish_reasons=["stop"], usage=usage)
        reason = "length" if "long" in user else "content_filter" if "filtered" in user else "stop"
        return ChatResult(texts=[f"{self.word} answer to: {user}".strip()], finish_reasons=[reason], usage=usage)


class MiscountingOracle:
    def complete(self, requests):
        return [ChatResult(texts=["x"])]


# --------------------------------------------------------------------------- GenerateResponses


def test_generate_responses_statuses_rows_and_requests():
    ds = Dataset.from_dict({
        "id": [10, 11, 12, 13, 14, 15],
        "instruction": ["Say hi.", "Summarise.", "Please fail.", "Stay silent.", "Write long.", ""],
        "input": ["", "Some text.", "", None, "", ""],
        "keep": list("abcdef"),
    })
    oracle = ScriptedOracle()
    stage = GenerateResponses(oracle, column="response_a", max_tokens=64, temperature=0.7, top_p=0.9, seed=3,
                              system_prompt="Be brief.")
    out = ds.map(stage, batched=True, batch_size=4)
    assert out["id"] == [10, 11, 12, 13, 14, 15] and out["keep"] == list("abcdef")
    assert out["response_a_status"] == ["ok", "ok", "oracle_error", "empty", "truncated", "empty_instruction"]
    assert out["response_a"][0] == "answer to: Say hi."
    assert out["response_a"][1] == "answer to: Summarise.\n\nSome text."     # input after a blank line
    assert out["response_a"][2:4] == ["", ""] and out["response_a"][5] == ""
    assert out["response_a_error"] == ["", "", "connection reset", "", "", ""]
    assert len(oracle.requests) == 5                                         # the empty instruction is not sent
    request = oracle.requests[0]
    assert request.message_dicts[0] == {"role": "system", "content": "Be brief."}
    assert (request.max_tokens, request.temperature, request.top_p, request.seed) == (64, 0.7, 0.9, 3)
    assert stage.usage == {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60}


def test_an_answer_stopped_by_a_content_filter_is_truncated_not_ok():
    """The provider's content filter cut the answer (`finish_reason` "content_filter"): the text
    written before the cut was `ok` and went to the judge as the model's whole answer."""
    out = GenerateResponses(ScriptedOracle())({"instruction": ["Get filtered.", "Say hi."]})
    assert out["response_status"] == ["truncated", "ok"] and out["response"][0] == "answer to: Get filtered."


def test_generate_responses_bad_input_and_bad_oracle():
    with pytest.raises(ColumnError, match="instruction"):
        Dataset.from_dict({"prompt": ["x"]}).map(GenerateResponses(ScriptedOracle()), batched=True)
    with pytest.raises(ColumnError, match="must hold strings"):
        GenerateResponses(ScriptedOracle())({"instruction": [3]})
    with pytest.raises(TypeError, match="complete"):
        GenerateResponses(object())
    with pytest.raises(RuntimeError, match="1 results for 2 requests"):
        GenerateResponses(MiscountingOracle())({"instruction": ["a", "b"]})


def test_generate_responses_with_local_model_uses_its_chat_template(smollm2_dir):
    import torch

    from reflectune_hf.oracles import TransformersOracle

    oracle = TransformersOracle("smollm2-135m-instruct", batch_size=2, max_new_tokens=64)
    ds = Dataset.from_dict({"instruction": ["Name a colour.", "Translate to French:"], "input": ["", "Good morning"]})
    out = ds.map(GenerateResponses(oracle, max_tokens=8), batched=True)
    assert set(out["response_status"]) <= {"ok", "truncated"} and all(out["response"])
    # The same answer as greedy decoding of the tokenizer's chat-templated question.
    model, tokenizer = oracle._load()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Translate to French:\n\nGood morning"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out["response"][1] == tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_stage_fingerprint_ignores_runtime_state():
    stage = GenerateResponses(ScriptedOracle(record=False))
    before = Hasher.hash(stage)
    stage({"instruction": ["Say hi."]})
    assert stage.usage["total_tokens"] == 15
    assert Hasher.hash(stage) == before                       # usage counters are transient
    assert pickle.loads(pickle.dumps(stage)).usage is None
    assert Hasher.hash(GenerateResponses(ScriptedOracle(record=False), temperature=0.5)) != before


# --------------------------------------------------------------------------- PairwiseJudge


def _pairs():
    return Dataset.from_dict({
        "id": list(range(7)),
        "instruction": ["Q0", "Q1", "Q2", "Q3", "Q4", "Q5", "Q6"],
        "input": ["", "ctx", "", "", "", "", ""],
        "response_a": ["good one", "poor one", "fair one", "good garble", "good boom", "", "fair one"],
        "response_b": ["poor one", "good one", "fair one", "poor one", "poor one", "good one", "fair one"],
    })


def test_pairwise_judge_sends_nothing_for_a_blank_question():
    """A response file's row with a blank instruction was judged (the answers scored blind) and `ok`."""
    oracle = ScriptedOracle()
    rows = Dataset.from_dict({"instruction": ["Q0", "  "], "response_a": ["good one", "good one"],
                              "response_b": ["poor one", ""]})
    out = rows.map(PairwiseJudge(oracle, max_tokens=32), batched=True)
    assert out["judge_status"] == ["ok", "empty_instruction"] and out["verdict"] == ["win", "error"]
    assert out["judge_error"][1] == "empty instruction; empty answer in response_b" and len(oracle.requests) == 2


def test_pairwise_judge_both_orders_verdicts_and_failures():
    oracle = ScriptedOracle()
    judge = PairwiseJudge(oracle, max_tokens=32)
    out = _pairs().map(judge, batched=True, batch_size=3)
    assert out["id"] == list(range(7))
    assert out["verdict"] == ["win", "lose", "tie", "error", "error", "error", "tie"]
    assert out["judge_status"] == ["ok", "ok", "ok", "unparseable", "oracle_error", "missing_response", "ok"]
    assert out["scores_ab"][0] == [9.0, 3.0] and out["scores_ba"][0] == [3.0, 9.0]
    assert all(math.isnan(x) for x in out["scores_ab"][3] + out["scores_ba"][4] + out["scores_ab"][5])
    assert out["judge_ab"][0].startswith("9 3") and out["judge_ba"][3] == "Both assistants tried their best."
    assert "no score line" in out["judge_error"][3] and "HTTP 500" in out["judge_error"][4]
    assert out["judge_error"][5] == "empty answer in response_a" and out["judge_error"][0] == ""
    # Both orders were sent, A first then B first, with the prompt of §11; nothing for the empty answer.
    assert len(oracle.requests) == 2 * 6
    ab, ba = oracle.requests[2], oracle.requests[3]          # row 1 (has an input)
    assert ab.message_dicts == judge_messages("Q1\n\nctx", "poor one", "good one")
    assert ba.message_dicts == judge_messages("Q1\n\nctx", "good one", "poor one")
    assert ab.message_dicts[0]["content"] == JUDGE_SYSTEM and (ab.max_tokens, ab.temperature) == (32, 0.0)
    s = judge_summary(out)
    assert (s["wins"], s["ties"], s["losses"], s["errors"], s["judged"]) == (1, 2, 1, 3, 4)
    assert s["win_score"] == 1.0


def test_pairwise_judge_position_bias_is_cancelled():
    # This judge adds 1 to whatever it reads first: one order alone would call equal answers a win.
    biased = PairwiseJudge(ScriptedOracle(bias=1))
    out = _pairs().select([0, 1, 2, 6]).map(biased, batched=True)
    assert out["scores_ab"][2] == [7.0, 6.0] and out["scores_ba"][2] == [7.0, 6.0]
    assert out["verdict"] == ["win", "lose", "tie", "tie"]


def test_pairwise_judge_custom_columns_and_missing_columns():
    ds = Dataset.from_dict({"instruction": ["Q"], "new": ["good"], "old": ["poor"]})
    assert ds.map(PairwiseJudge(ScriptedOracle(), columns=("new", "old")), batched=True)["verdict"] == ["win"]
    with pytest.raises(ColumnError, match="response_b"):
        ds.map(PairwiseJudge(ScriptedOracle()), batched=True)


def test_generate_then_judge_pipeline():
    questions = Dataset.from_dict({"instruction": ["good question", "fair question"], "input": ["", ""]})
    ds = questions.map(GenerateResponses(ScriptedOracle(word="good"), column="response_a"), batched=True)
    ds = ds.map(GenerateResponses(ScriptedOracle(word="poor"), column="response_b"), batched=True)
    judged = ds.map(PairwiseJudge(ScriptedOracle()), batched=True)
    assert judge_summary(judged)["wins"] == 2


# --------------------------------------------------------------------------- load_eval_set

SMALL_SETS = {
    "vicuna": [{"question_id": 1, "text": "How can I sleep better?", "category": "generic"}],
    "wizardlm": [{"idx": 5, "Skill": "Math", "Difficulty": 1, "Instruction": "f(x) = 6x^2, so f(4) ="}],
    "koala": [{"id": "koala_0", "prompt": "List 3 films."}],
    "sinstruct": [{"id": "t0", "motivation_app": "Grammarly", "instruction": "Rewrite concisely.",
                   "instances": [{"input": "If you have any questions, please ask.", "output": "Ask away."}]},
                  {"id": "t1", "motivation_app": "x", "instruction": "Tell a joke.",
                   "instances": [{"input": "", "output": "..."}]}],
    "lima": [{"conversations": "Write a haiku."}, {"conversations": ["Turn one?", "Answer one."]}],
}
EXPECTED = {
    "vicuna": [("How can I sleep better?", "", "1")],
    "wizardlm": [("f(x) = 6x^2, so f(4) =", "", "5")],
    "koala": [("List 3 films.", "", "koala_0")],
    "sinstruct": [("Rewrite concisely.", "If you have any questions, please ask.", "t0"), ("Tell a joke.", "", "t1")],
    "lima": [("Write a haiku.", "", "0"), ("Turn one?", "", "1")],
}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(SMALL_SETS))
def test_load_eval_set_small_files(tmp_path, name):
    ds = load_eval_set(_write_jsonl(tmp_path / f"{name}_test_set.jsonl", SMALL_SETS[name]))
    assert ds.column_names == ["id", "instruction", "input", "test_set", "source_id"]
    assert [(r["instruction"], r["input"], r["source_id"]) for r in ds] == EXPECTED[name]
    assert ds["id"] == list(range(len(ds))) and set(ds["test_set"]) == {name}


def test_load_eval_set_names_arrays_limits_and_errors(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "koala_test_set.jsonl", SMALL_SETS["koala"] * 3)
    assert len(load_eval_set("koala", eval_dir=tmp_path)) == 3
    monkeypatch.setenv("REFLECTUNE_HF_EVAL_DIR", str(tmp_path))
    assert len(load_eval_set("koala", max_rows=2)) == 2
    assert len(load_eval_set("koala", max_rows=10)) == 3
    for bad in (0, -1):  # 0 is not "all rows" (that is None)
        with pytest.raises(ValueError, match="max_rows must be >= 1"):
            load_eval_set("koala", max_rows=bad)
    array = tmp_path / "mine.json"
    array.write_text(json.dumps([{"instruction": "Add.", "input": "2 3"}]))
    assert load_eval_set(array)[0]["input"] == "2 3"                          # plain Alpaca rows, JSON array
    forced = load_eval_set(_write_jsonl(tmp_path / "both.jsonl", [{"text": "T", "prompt": "P"}]), format="vicuna")
    assert forced["instruction"] == ["T"]
    with pytest.raises(FileNotFoundError, match="not bundled"):
        load_eval_set("no_such_set")
    with pytest.raises(ValueError, match="Cannot tell the test-set format.*'question'"):
        load_eval_set(_write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}]))
    with pytest.raises(ValueError, match="Unknown test-set format"):
        load_eval_set(array, format="mmlu")
    with pytest.raises(ValueError, match="row 1 has no 'prompt'"):
        load_eval_set(_write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a"}, {"text": "b"}]))
    with pytest.raises(ValueError, match="holds no rows"):
        load_eval_set(_write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="not JSON"):
        load_eval_set(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="must be a string"):
        load_eval_set(_write_jsonl(tmp_path / "num.jsonl", [{"text": 5}]))


def test_alpaca_rows_with_a_text_column_are_read_by_their_instruction(tmp_path):
    """tatsu-lab/alpaca rows carry `text`, the whole prompt with the reference answer: detected as
    vicuna, that prompt (answer included) became the question the models answered and were judged on."""
    row = {"instruction": "Give a tip.", "input": "", "output": "Sleep.", "prompt": "P",
           "text": "Below is an instruction...\n### Instruction:\nGive a tip.\n\n### Response:\nSleep."}
    ds = load_eval_set(_write_jsonl(tmp_path / "alpaca_test_set.jsonl", [row]))
    assert (ds[0]["instruction"], ds[0]["input"]) == ("Give a tip.", "")


@pytest.mark.parametrize("instances", [["just a string"], {"input": "x"}, "x"])
def test_self_instruct_instances_of_another_shape_are_a_clear_error(tmp_path, instances):
    """`instances` that is not a list of objects died deep inside (AttributeError / KeyError)."""
    path = _write_jsonl(tmp_path / "si_test_set.jsonl", [{"instruction": "Q", "instances": instances}])
    with pytest.raises(ValueError, match=r"row 0: 'instances' must be a list of objects"):
        load_eval_set(path)


def test_load_eval_set_the_five_public_sets(shared_data):
    sizes = {"vicuna": 80, "wizardlm": 218, "koala": 180, "sinstruct": 252, "lima": 300}
    for name, size in sizes.items():
        ds = load_eval_set(name, eval_dir=shared_data / "eval")
        assert len(ds) == size and set(ds["test_set"]) == {name}
        assert all(q.strip() for q in ds["instruction"]), name
    sinstruct = load_eval_set(shared_data / "eval" / "sinstruct_test_set.jsonl")
    assert sum(1 for x in sinstruct["input"] if x) == 208               # instances[0].input where present
    assert load_eval_set(shared_data / "eval" / "vicuna_test_set.jsonl")[0]["instruction"] == \
        "How can I improve my time management skills?"


# --------------------------------------------------------------------------- the eval script


def run_script(*args, cli: bool = False):
    """`python scripts/evaluate.py ARGS` (or `reflectune eval ARGS` with `cli=True`), this checkout first."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = ["-m", "reflectune_hf", "eval"] if cli else [str(REPO / "scripts" / "evaluate.py")]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, env=env, timeout=540)


def test_eval_script_rejects_inconsistent_flags():
    result = run_script("--model_a", "x", "--judge_model", "j")
    assert result.returncode == 2 and "--model_b" in result.stderr
    result = run_script("--responses_a", "a.jsonl", "--judge_model", "j")
    assert result.returncode == 2 and "both --responses_a and --responses_b" in result.stderr
    result = run_script("--model_a", "x", "--model_b", "y", "--test_sets", "vicuna", cli=True)   # reflectune eval
    assert result.returncode == 2 and "--judge_model is required" in result.stderr
    assert "usage: reflectune eval" in result.stderr


@pytest.mark.parametrize("extra", [{"test_sets": ["vicuna"]}, {"eval_dir": "evals"}, {"base_url_b": "http://h/v1"}])
def test_response_files_refuse_the_options_of_models_that_answer(extra):
    """With two response files, --test_sets, --eval_dir and the models' servers were silently ignored."""
    from reflectune_hf.cli import eval_job as eval_run

    with pytest.raises(ValueError, match=f"--{next(iter(extra))} is for models that answer test sets"):
        eval_run.EvalConfig(responses_a="a.jsonl", responses_b="b.jsonl", judge_model="j", **extra)


def test_response_files_with_a_repeated_id_are_refused(tmp_path):
    """Paired by id, a repeated id in A judged one B answer twice and dropped another silently."""
    from reflectune_hf.cli import eval_job as eval_run

    rows = [{"id": i, "instruction": "Q", "response": "r"} for i in (0, 1, 2)]
    _write_jsonl(tmp_path / "a.jsonl", [rows[0], rows[1], rows[1]])
    _write_jsonl(tmp_path / "b.jsonl", rows)
    config = eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(tmp_path / "b.jsonl"),
                                 judge_model="j", output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"a\.jsonl repeats the ids \[1\]"):
        eval_run.run_eval(config)


def test_response_files_paired_by_row_compare_the_inputs_too(tmp_path):
    """Only the instructions were compared: rows asking one instruction of different inputs (a
    classification set) paired A's answer to one input with B's answer to the other, silently."""
    from reflectune_hf.cli import eval_job as eval_run

    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Classify", "input": "I love it", "response": "positive"},
                                        {"instruction": "Classify", "input": "I hate it", "response": "negative"}])
    _write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Classify", "input": "I hate it", "response": "neg"},
                                        {"instruction": "Classify", "input": "I love it", "response": "pos"}])
    config = eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(tmp_path / "b.jsonl"),
                                 judge_model="j", output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="Row 0 asks different questions.*'I love it' vs 'I hate it'"):
        eval_run._paired(config)


def test_run_eval_with_response_files(tmp_path, monkeypatch):
    from reflectune_hf.cli import eval_job as eval_run

    rows = [{"id": i, "instruction": f"Q{i}", "test_set": "mine"} for i in range(4)]
    _write_jsonl(tmp_path / "a.jsonl", [{**r, "response": w} for r, w in zip(rows, ["good", "good", "fair", "poor"])])
    _write_jsonl(tmp_path / "b.jsonl",
                 [{**r, "output": w} for r, w in zip(rows[::-1], ["fair", "fair", "poor", "good"])])
    monkeypatch.setattr(eval_run, "make_oracle",
                        lambda model, base_url, max_new_tokens=None, **server: ScriptedOracle())
    config = eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(tmp_path / "b.jsonl"),
                                 judge_model="scripted", judge_base_url="http://user:s3cret@127.0.0.1:9/v1",
                                 output_dir=str(tmp_path / "out"))
    result = eval_run.run_eval(config)
    # b is in reverse order: aligned by id, so the pairs are (good, good) (good, poor) (fair, fair) (poor, fair).
    s = result["summaries"]["mine"]
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (1, 2, 1, 0)
    judged = [json.loads(line) for line in open(result["files"]["mine"])]
    assert [r["verdict"] for r in judged] == ["tie", "win", "tie", "lose"]
    text = open(result["files"]["summary"]).read()
    assert "s3cret" not in text and "http://127.0.0.1:9/v1" in text          # credentials never stored
    summary = json.loads(text)
    assert summary["config"]["base_url_a"] is None and summary["config"]["label_a"] == "A"
    assert summary["summaries"]["mine"]["judged"] == 4 and summary["config"]["judge_model"] == "scripted"
    assert "mine" in result["table"] and open(result["files"]["chart"], "rb").read(4) == b"\x89PNG"
    bad = tmp_path / "c.jsonl"
    _write_jsonl(bad, [{"id": i, "instruction": f"other {i}", "response": "x"} for i in range(4)])
    with pytest.raises(ValueError, match="different questions"):
        eval_run.run_eval(eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(bad),
                                              judge_model="scripted", output_dir=str(tmp_path / "out2")))


def test_max_rows_bounds_response_files_too(tmp_path, monkeypatch):
    """`--max_rows` ("only the first N questions of each set") was ignored with response files:
    a smoke run against a paid judge judged every row."""
    from reflectune_hf.cli import eval_job as eval_run

    for name in ("a", "b"):
        _write_jsonl(tmp_path / f"{name}.jsonl", [{"instruction": f"Q{i}", "response": "good", "test_set": s}
                                                  for s in ("one", "two") for i in range(3)])
    monkeypatch.setattr(eval_run, "make_oracle", lambda *args, **kwargs: ScriptedOracle())
    config = eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(tmp_path / "b.jsonl"),
                                 judge_model="scripted", max_rows=2, output_dir=str(tmp_path / "out"))
    summaries = eval_run.run_eval(config)["summaries"]
    assert {name: s["judged"] for name, s in summaries.items()} == {"one": 2, "two": 2}


def test_response_files_keep_keys_the_first_row_lacks(tmp_path):
    """`Dataset.from_list` kept only the first row's keys: a later row's `input` was dropped and the
    judge saw its question without it."""
    from reflectune_hf.cli import eval_job as eval_run

    _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q0", "response": "r0"},
                                        {"instruction": "Q1", "input": "the table", "response": "r1"}])
    ds, column = eval_run._read_responses(str(tmp_path / "a.jsonl"))
    assert column == "response" and ds["input"] == [None, "the table"]


def test_make_oracle_picks_server_or_local():
    from reflectune_hf.oracles import LlamaCppOracle, OpenAIOracle, TransformersOracle
    from reflectune_hf.oracles.factory import make_oracle

    served = {"max_new_tokens": 64, "local_without_base_url": True}   # as `reflectune eval` builds them
    remote = make_oracle("m", "http://127.0.0.1:9/v1", **served)
    assert isinstance(remote, OpenAIOracle) and remote.model == "m" and remote.base_url == "http://127.0.0.1:9/v1"
    local = make_oracle("smollm2-135m-instruct", None, **served)        # loads nothing until first use
    # the embedded GGUF runs on llama.cpp; a local oracle allows twice the budget (the truncated re-ask's)
    assert isinstance(local, LlamaCppOracle) and local.max_new_tokens == 128
    assert isinstance(make_oracle("local:smollm2-135m-instruct", None, local_engine="transformers", **served),
                      TransformersOracle)
    assert isinstance(make_oracle("m"), OpenAIOracle)                     # without the flag: OpenAI's API
    with pytest.raises(ValueError, match="a model name is required"):
        make_oracle(" ")


def test_one_place_builds_oracles_from_names():
    """Only `oracles/factory.py` turns a name into an oracle class, in the package and the job scripts
    (benchmarks build the one oracle they measure)."""
    import re
    from pathlib import Path

    import reflectune_hf

    root = Path(reflectune_hf.__file__).parent
    files = [*root.rglob("*.py"), *(p for p in (root.parent / "scripts").glob("*.py") if not p.name.startswith("bench"))]
    built = re.compile(r"(?<![\w\"`])(OpenAIOracle|OpenAIBatchOracle|TransformersOracle)\(")
    found = sorted(str(p.name) for p in files if p.name != "factory.py" and any(
        built.search(line) and not line.lstrip().startswith((">>>", "...", "class ", "#"))
        for line in p.read_text().splitlines()))
    assert found == []


def test_run_eval_two_models_on_named_test_sets(tmp_path, monkeypatch, capsys):
    from reflectune_hf.cli import eval_job as eval_run

    _write_jsonl(tmp_path / "vicuna_test_set.jsonl", [{"question_id": i, "text": f"good q{i}"} for i in range(3)])
    _write_jsonl(tmp_path / "koala_test_set.jsonl", [{"id": f"k{i}", "prompt": f"fair q{i}"} for i in range(4)])

    made = []

    def fake(model, base_url, max_new_tokens=None, **server):
        made.append((model, base_url, max_new_tokens))
        return ScriptedOracle(word={"ma": "good", "mb": "poor"}.get(model, ""))

    monkeypatch.setattr(eval_run, "make_oracle", fake)
    config = eval_run.EvalConfig(test_sets=["vicuna", "koala"], eval_dir=str(tmp_path), max_rows=2, model_a="ma",
                                 model_b="mb", base_url_b="http://127.0.0.1:9/v1", judge_model="j",
                                 max_new_tokens=32, judge_max_tokens=16, output_dir=str(tmp_path / "out"))
    result = eval_run.run_eval(config)
    assert made == [("ma", None, 32), ("mb", "http://127.0.0.1:9/v1", 32), ("j", None, 16)]
    assert {k: (s["rows"], s["wins"]) for k, s in result["summaries"].items()} == {"vicuna": (2, 2), "koala": (2, 2)}
    koala = [json.loads(line) for line in open(result["files"]["koala"])]
    assert koala[0]["response_a"] == "good answer to: fair q0" and koala[0]["source_id"] == "k0"
    assert "koala" in capsys.readouterr().out


def test_run_eval_refuses_two_test_sets_of_one_name(tmp_path, monkeypatch):
    # Two versions of vicuna in two folders: one would overwrite the other's rows, file and summary.
    from reflectune_hf.cli import eval_job as eval_run

    for folder in ("v1", "v2"):
        (tmp_path / folder).mkdir()
        _write_jsonl(tmp_path / folder / "vicuna_test_set.jsonl", [{"question_id": 1, "text": f"good {folder}"}])
    oracles = []
    monkeypatch.setattr(eval_run, "make_oracle",
                        lambda *a, **k: oracles.append(ScriptedOracle(word="good")) or oracles[-1])
    config = eval_run.EvalConfig(test_sets=[str(tmp_path / f / "vicuna_test_set.jsonl") for f in ("v1", "v2")],
                                 model_a="ma", model_b="mb", judge_model="j", output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="two test sets are named 'vicuna'"):
        eval_run.run_eval(config)
    assert not oracles  # refused before any model loads


def test_every_stage_that_calls_an_oracle_shares_one_loop():
    """Reflection, Tuna and evaluation stages derive from `OracleCaller` (one request/complete loop:
    length check, usage, ids); no other package code calls an oracle's `complete` (#19.2)."""
    import re
    from pathlib import Path

    import reflectune_hf
    from reflectune_hf.evaluation.stages import GenerateResponses, PairwiseJudge
    from reflectune_hf.oracles.stage import OracleCaller
    from reflectune_hf.reflection.stages import CompressInstruction, ReflectInstruction, ReflectResponse
    from reflectune_hf.tuna.stages import ContextualRank, SampleResponses

    for stage in (CompressInstruction, ReflectInstruction, ReflectResponse, SampleResponses, ContextualRank,
                  GenerateResponses, PairwiseJudge):
        assert issubclass(stage, OracleCaller), stage
    root = Path(reflectune_hf.__file__).parent
    calls = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if p.parts[-2] != "oracles" and re.search(r"oracle\.complete\(", p.read_text())]
    assert calls == []


def test_cached_answers_cost_no_usage_in_evaluation_stages():
    """A cached answer sent nothing: like the reflection stages, the evaluation stages do not count it."""
    class Cached:
        def complete(self, requests):
            return [ChatResult(texts=["7 8\nFine."], finish_reasons=["stop"], cached=True,
                               usage={"prompt_tokens": 5, "completion_tokens": 2}) for _ in requests]

    generate = GenerateResponses(Cached())
    generate({"instruction": ["Q"]})
    judge = PairwiseJudge(Cached())
    judge({"instruction": ["Q"], "response_a": ["a"], "response_b": ["b"]})
    assert generate.usage == {} and judge.usage == {}
    with pytest.raises(RuntimeError, match="PairwiseJudge: Short.complete returned 0 results for 2 requests"):
        PairwiseJudge(type("Short", (), {"complete": lambda self, r: []})())(
            {"instruction": ["Q"], "response_a": ["a"], "response_b": ["b"]})


def test_run_eval_summary_keeps_no_secret_query_parameter(tmp_path, monkeypatch):
    """summary.json stores the servers' URLs without user:password@ and without secret-named query
    parameters (`?api_key=...`), as every other file the package writes."""
    from reflectune_hf.cli import eval_job as eval_run

    rows = [{"id": 0, "instruction": "Q0", "test_set": "mine"}]
    _write_jsonl(tmp_path / "a.jsonl", [{**rows[0], "response": "good"}])
    _write_jsonl(tmp_path / "b.jsonl", [{**rows[0], "response": "fair"}])
    monkeypatch.setattr(eval_run, "make_oracle",
                        lambda model, base_url, max_new_tokens=None, **server: ScriptedOracle())
    config = eval_run.EvalConfig(responses_a=str(tmp_path / "a.jsonl"), responses_b=str(tmp_path / "b.jsonl"),
                                 judge_model="scripted", output_dir=str(tmp_path / "out"),
                                 judge_base_url="https://u:pw@judge.example.com/v1?api_key=sk-leak&region=eu")
    text = open(eval_run.run_eval(config)["files"]["summary"]).read()
    assert "sk-leak" not in text and "pw@" not in text
    assert json.loads(text)["config"]["judge_base_url"] == "https://judge.example.com/v1?region=eu"
