"""Evaluation against the real llama.cpp server fixture (REFERENCE.md §11 acceptance): answers
in two settings, the judge in both orders, the summary and the chart. The 135M judge often
writes no score line: such rows must come out as `error`, and the run must complete. Slow on
2 cores (8 judge prompts of ~300 tokens each).
"""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from reflectune_hf.evaluation.stages import (VERDICTS, GenerateResponses, PairwiseJudge, judge_summary, load_eval_set,
                                    parse_judge_scores, plot_judge)
from reflectune_hf.oracles import OpenAIOracle

from test_evaluate import run_script

ANSWER_TOKENS = 24
JUDGE_TOKENS = 16  # the score line comes first; the explanation is not needed for the verdict
ROWS = 4  # vicuna questions: 2 answers and 2 judge orders each, every request ~300 prompt tokens


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


@pytest.mark.slow
@pytest.mark.server
def test_generate_and_judge_vicuna_with_real_oracles(llama_server, shared_data, tmp_path):
    ds = load_eval_set(shared_data / "eval" / "vicuna_test_set.jsonl", max_rows=ROWS)
    server = OpenAIOracle(llama_server.model, base_url=llama_server.base_url)
    # Two settings of the local model: greedy, and sampled at temperature 0.9 with a brevity instruction.
    ds = ds.map(GenerateResponses(server, column="response_a", max_tokens=ANSWER_TOKENS), batched=True)
    ds = ds.map(GenerateResponses(server, column="response_b", max_tokens=ANSWER_TOKENS, temperature=0.9, seed=7,
                                  system_prompt="Answer in one or two sentences."), batched=True)
    for column in ("response_a", "response_b"):
        assert set(ds[f"{column}_status"]) <= {"ok", "truncated"}, list(ds[f"{column}_error"])
        assert all(text.strip() for text in ds[column])
    assert list(ds["response_a"]) != list(ds["response_b"])

    judge = PairwiseJudge(server, max_tokens=JUDGE_TOKENS)
    judged = ds.map(judge, batched=True, batch_size=ROWS)
    assert all(judged["judge_ab"]) and all(judged["judge_ba"])       # both orders were asked for every row
    assert judge.usage["completion_tokens"] > 0
    summary = _check_judged(judged, ROWS)
    print(f"vicuna x{ROWS}, SmolLM2 judge:", json.dumps(summary))
    path = plot_judge({f"vicuna ({ROWS})": summary}, tmp_path / "judge.png", title="greedy vs sampled",
                      labels=("greedy", "sampled"))
    assert imread(path).shape[-1] in (3, 4)


@pytest.mark.slow
@pytest.mark.server
def test_eval_script_response_files_with_server_judge(llama_server, tmp_path):
    """`reflectune eval` in a subprocess, as a user runs it: two response files, the server as judge."""
    rows = [{"id": 0, "instruction": "What is the capital of France?"},
            {"id": 1, "instruction": "Name a primary colour."}]
    files = {}
    for name, answers in (("good", ["Paris.", "Red."]), ("bad", ["Lyon.", "Maybe green?"])):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({**r, "response": t, "test_set": "quiz"}) + "\n"
                                       for r, t in zip(rows, answers)))
    out = tmp_path / "out"
    result = run_script("--responses_a", str(files["good"]), "--responses_b", str(files["bad"]),
                        "--judge_model", llama_server.model, "--judge_base_url", llama_server.base_url,
                        "--judge_max_tokens", "12", "--label_a", "good", "--label_b", "bad", "--output_dir", str(out),
                        cli=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "good vs bad" in result.stdout and "quiz" in result.stdout
    saved = json.loads((out / "summary.json").read_text())
    assert saved["config"]["judge_base_url"] == llama_server.base_url and saved["summaries"]["quiz"]["rows"] == 2
    judged = [json.loads(line) for line in (out / "quiz.jsonl").read_text().splitlines()]
    assert [r["id"] for r in judged] == [0, 1] and all(r["judge_ab"] and r["judge_ba"] for r in judged)
    assert all(r["verdict"] in VERDICTS for r in judged)
    assert imread(out / "judge.png").ndim == 3
