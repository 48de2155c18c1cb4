"""Tuna end to end against the real llama.cpp server: sampling with logprobs, ranking, CPU training
on SmolLM2, the contextual judge, and scripts/tuna.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from reflectune_hf.oracles import OpenAIOracle
from reflectune_hf.tuna import ContextualRank, SampleResponses, rank_by_logprob

pytestmark = [pytest.mark.server, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_sample_rank_and_train_on_smollm2(llama_server, sample, tmp_path):
    from reflectune_hf.tuna_trainer import TunaConfig, TunaTrainer

    rows = sample.select(range(4))
    oracle = OpenAIOracle(llama_server.model, base_url=llama_server.base_url, max_concurrency=4)
    stage = SampleResponses(oracle, n=4, max_tokens=32, seed=3)
    sampled = rows.map(stage, batched=True)
    assert sampled["id"] == rows["id"] and sampled["sample_status"] == ["ok"] * 4
    for texts, scores in zip(sampled["responses"], sampled["avg_logprobs"]):
        assert len(texts) == 4 and all(t.strip() for t in texts)
        assert len(scores) == 4 and all(math.isfinite(s) and s <= 0 for s in scores)
    # The scores are the mean of the server's token logprobs (the rerun is served by the cache).
    [again] = oracle.complete([_request(stage, rows[0])])
    assert again.cached and [sum(t["logprob"] for t in c) / len(c) for c in again.logprobs] == pytest.approx(
        sampled["avg_logprobs"][0])

    ranked = sampled.map(rank_by_logprob, batched=True)
    assert ranked["ranking_status"] == ["ok"] * 4
    for texts, scores, best_first in zip(ranked["responses"], ranked["avg_logprobs"], ranked["ranked_responses"]):
        assert best_first == [texts[k] for k in sorted(range(4), key=lambda k: -scores[k])]

    # A few CPU steps on SmolLM2, the same batch (a row and its 4 ranked candidates) each step: the loss falls.
    args = TunaConfig(str(tmp_path / "tuna"), max_steps=3, per_device_train_batch_size=1, learning_rate=1e-4,
                      lr_scheduler_type="constant", warmup_steps=0, max_length=128, use_cpu=True, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = TunaTrainer("smollm2-135m-instruct", args=args, train_dataset=ranked.select(range(1)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(math.isfinite(h["ce_loss"]) and h["rank_loss"] >= 0 and 0 <= h["rank_accuracy"] <= 1 for h in logs)


def _request(stage, row):
    """The ChatRequest SampleResponses sends for one row."""
    from reflectune_hf.oracles.base import ChatRequest
    from reflectune_hf.tuna import format_prompt

    return ChatRequest(messages=[{"role": "user", "content": format_prompt(row["instruction"], row["input"])}],
                       temperature=stage.temperature, top_p=stage.top_p, max_tokens=stage.max_tokens, n=stage.n,
                       logprobs=True, seed=stage.seed)


def test_contextual_rank_with_the_real_judge_keeps_every_row(llama_server, sample):
    rows = sample.select(range(2)).add_column("responses", [["Paris.", "Lyon."], []])
    judge = OpenAIOracle(llama_server.model, base_url=llama_server.base_url)
    out = rows.map(ContextualRank(judge, max_tokens=32, format_retries=0), batched=True)
    assert out["id"] == rows["id"] and out["ranking_raw"][0] and judge.usage["requests"] == 1
    assert out["ranking_status"][1] == "no_responses" and out["ranking_raw"][1] == ""  # no call for it
    # A 135M judge rarely writes a ranking: the row says what happened and is kept.
    assert out["ranking_status"][0] in ("ok", "repaired", "no_ranking")
    assert all(0 <= k <= 2 for k in out["rank"][0]) and len(out["ranked_responses"][0]) <= len(out["rank"][0])


def load_script():
    spec = importlib.util.spec_from_file_location("tuna_script", REPO / "scripts" / "tuna.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_smoke_recipe(llama_server, tmp_path):
    script = load_script()
    script_args, training_args, model_args = script.make_parser().parse_args_and_config([
        "--config", str(REPO / "scripts" / "configs" / "tuna_smoke_cpu.yaml"), "--output_dir", str(tmp_path / "out"),
        "--oracle_base_url", llama_server.base_url, "--oracle_model", llama_server.model,
        "--max_samples", "2", "--max_steps", "1", "--per_device_train_batch_size", "1", "--sample_max_tokens", "16",
        "--ranked_dataset_path", str(tmp_path / "ranked"), "--mix_original", "true", "--disable_tqdm", "true",
    ])
    assert (training_args.learning_rate, training_args.max_length, training_args.template) == (1e-4, 128, "alpaca")
    script.main(script_args, training_args, model_args)
    from datasets import load_from_disk

    ranked = load_from_disk(str(tmp_path / "ranked"))
    assert ranked["ranking_status"] == ["ok", "ok"] and all(len(r) == 4 for r in ranked["ranked_responses"])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and math.isfinite(state["log_history"][0]["loss"])
    assert (tmp_path / "out" / "model.safetensors").is_file()
