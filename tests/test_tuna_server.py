"""Tuna end to end against the real llama.cpp server: sampling with logprobs, ranking by them, and a
few CPU training steps on SmolLM2."""

from __future__ import annotations

import math

import pytest

from reflectune_hf.oracles import OpenAIOracle
from reflectune_hf.tuna.stages import SampleResponses, format_prompt, rank_by_logprob

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_sample_rank_and_train_on_smollm2(llama_server, sample, tmp_path):
    from reflectune_hf.tuna.trainer import TunaConfig, TunaTrainer

    rows = sample.select(range(2))  # each sampled token costs llama-cpp-python a sort of the 49k vocabulary
    oracle = OpenAIOracle(llama_server.model, base_url=llama_server.base_url, max_concurrency=4)
    stage = SampleResponses(oracle, n=4, max_tokens=24, seed=3, template=None)  # short prompts and answers
    sampled = rows.map(stage, batched=True)
    assert sampled["id"] == rows["id"] and sampled["sample_status"] == ["ok"] * len(rows)
    for texts, scores in zip(sampled["responses"], sampled["avg_logprobs"]):
        assert len(texts) == 4 and all(t.strip() for t in texts)
        assert len(scores) == 4 and all(math.isfinite(s) and s <= 0 for s in scores)
    # The scores are the mean of the server's token logprobs (the rerun is served by the cache).
    [again] = oracle.complete([stage.request(format_prompt(rows[0]["instruction"], rows[0]["input"], None))])
    assert again.cached and [sum(t["logprob"] for t in c) / len(c) for c in again.logprobs] == pytest.approx(
        sampled["avg_logprobs"][0])

    ranked = sampled.map(rank_by_logprob, batched=True)
    assert ranked["ranking_status"] == ["ok"] * len(rows)
    for texts, scores, best_first in zip(ranked["responses"], ranked["avg_logprobs"], ranked["ranked_responses"]):
        assert best_first == [texts[k] for k in sorted(range(4), key=lambda k: -scores[k])]

    # A few CPU steps on SmolLM2, the same batch (a row and its 4 ranked candidates) each step: the loss falls.
    args = TunaConfig(str(tmp_path / "tuna"), max_steps=3, per_device_train_batch_size=1, learning_rate=5e-5,
                      lr_scheduler_type="constant", warmup_steps=0, max_length=128, use_cpu=True, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)
    trainer = TunaTrainer("smollm2-135m-instruct", args=args, train_dataset=ranked.select(range(1)))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(math.isfinite(h["ce_loss"]) and h["rank_loss"] >= 0 and 0 <= h["rank_accuracy"] <= 1 for h in logs)
