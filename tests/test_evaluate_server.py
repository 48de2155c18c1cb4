"""Evaluation against real oracles: the llama.cpp server fixture and the local TransformersOracle
(REFERENCE.md §11 acceptance). The 135M judge often writes no score line: such rows must come
out as `error`, and the run must complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from matplotlib.image import imread

from reflectune_hf.evaluate import (VERDICTS, GenerateResponses, PairwiseJudge, judge_summary, load_eval_set,
                                    parse_judge_scores, plot_judge)
from reflectune_hf.oracles import OpenAIOracle, TransformersOracle

from conftest import REPO

ANSWER_TOKENS = 48
JUDGE_TOKENS = 24  # the score line comes first; the explanation is not needed for the verdict


def _check_judged(judged, rows: int) -> dict:
    assert len(judged) == rows and judged["id"] == list(range(rows))
    for row in judged:
        assert row["verdict"] in VERDICTS
        assert (row["verdict"] == "error") == (row["judge_status"] != "ok"), row
        for order in ("ab", "ba"):
            parsed = parse_judge_scores(row[f"judge_{order}"])
            if parsed is not None:
                assert row[f"scores_{order}"] == list(parsed)
        if row["judge_status"] == "unparseable":
            assert any(parse_judge_scores(row[f"judge_{o}"]) is None for o in ("ab", "ba"))
    summary = judge_summary(judged)
    assert summary["wins"] + summary["ties"] + summary["losses"] + summary["errors"] == rows
    return summary


@pytest.mark.server
def test_generate_and_judge_vicuna_with_real_oracles(llama_server, shared_data, tmp_path):
    ds = load_eval_set(shared_data / "eval" / "vicuna_test_set.jsonl", max_rows=8)
    server = OpenAIOracle(llama_server.model, base_url=llama_server.base_url)
    local = TransformersOracle("smollm2-135m-instruct", batch_size=8, max_new_tokens=ANSWER_TOKENS)
    # Two settings: the llama.cpp server's Q4_1 GGUF, greedy; transformers' float32 model told to be brief.
    ds = ds.map(GenerateResponses(server, column="response_a", max_tokens=ANSWER_TOKENS), batched=True)
    ds = ds.map(GenerateResponses(local, column="response_b", max_tokens=ANSWER_TOKENS,
                                  system_prompt="Answer in one or two sentences."), batched=True)
    for column in ("response_a", "response_b"):
        assert set(ds[f"{column}_status"]) <= {"ok", "truncated"}, ds[f"{column}_error"]
        assert all(text.strip() for text in ds[column])
    assert list(ds["response_a"]) != list(ds["response_b"])

    judge = PairwiseJudge(server, max_tokens=JUDGE_TOKENS)
    judged = ds.map(judge, batched=True, batch_size=4)
    assert all(judged["judge_ab"]) and all(judged["judge_ba"])       # both orders were asked for every row
    assert judge.usage["completion_tokens"] > 0
    summary = _check_judged(judged, 8)
    print("vicuna x8, SmolLM2 judge:", json.dumps(summary))
    path = plot_judge({"vicuna (8)": summary}, tmp_path / "judge.png", title="llama.cpp vs transformers",
                      labels=("llama.cpp", "transformers"))
    assert imread(path).shape[-1] in (3, 4)


def _script(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args], capture_output=True,
                          text=True, env=env, timeout=540)


def test_eval_script_response_files_with_local_judge(tmp_path):
    rows = [{"id": 0, "instruction": "What is the capital of France?"},
            {"id": 1, "instruction": "Name a primary colour."}]
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({**r, "response": t}) + "\n" for r, t in zip(rows, ["Paris.", "Red."])))
    b.write_text("".join(json.dumps({**r, "response": t}) + "\n" for r, t in zip(rows, ["Lyon.", "Maybe green?"])))
    out = tmp_path / "out"
    result = _script("--responses_a", str(a), "--responses_b", str(b), "--judge_model", "smollm2-135m-instruct",
                     "--judge_max_tokens", "12", "--label_a", "good", "--label_b", "bad", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "good vs bad" in result.stdout and "win score" in result.stdout
    summary = json.loads((out / "summary.json").read_text())["summaries"]["a"]
    assert summary["rows"] == 2
    judged = [json.loads(line) for line in (out / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in judged] == [0, 1] and all(r["judge_ab"] for r in judged)
    assert imread(out / "judge.png").ndim == 3


@pytest.mark.server
def test_eval_script_two_models_on_test_sets(llama_server, shared_data, tmp_path):
    out = tmp_path / "out"
    result = _script("--test_sets", "vicuna", "koala", "--eval_dir", str(shared_data / "eval"), "--max_rows", "2",
                     "--model_a", llama_server.model, "--base_url_a", llama_server.base_url,
                     "--model_b", "smollm2-135m-instruct", "--max_new_tokens", "24",
                     "--judge_model", llama_server.model, "--judge_base_url", llama_server.base_url,
                     "--judge_max_tokens", "16", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["summaries"]) == {"vicuna", "koala"}
    assert saved["config"]["base_url_a"] == llama_server.base_url
    for name in ("vicuna", "koala"):
        judged = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert len(judged) == 2 and all(r["response_a"] and r["response_b"] for r in judged)
        assert name in result.stdout
    assert imread(out / "judge.png").ndim == 3
