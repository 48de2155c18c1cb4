"""OpenAIOracle against the real llama.cpp server, counted by a loopback proxy in front of it."""

from __future__ import annotations

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIOracle
from loopback import LoopbackServer

pytestmark = pytest.mark.server

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?", "Say hello."]


def ask(prompts, **kwargs):
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


def test_32_concurrent_requests_then_a_rerun_sends_zero(llama_server):
    prompts = [f"{QUESTIONS[i % 4]} (variant {i})" for i in range(32)]
    with LoopbackServer(upstream=llama_server.base_url) as proxy:
        oracle = OpenAIOracle(llama_server.model, base_url=proxy.base_url, max_concurrency=32)
        results = oracle.complete(ask(prompts, max_tokens=4))
        assert all(r.ok and r.text.strip() and not r.cached for r in results), [r.error for r in results]
        assert all(r.usage["prompt_tokens"] > 0 and r.usage["completion_tokens"] > 0 for r in results)
        assert sorted({e["prompt"] for e in proxy.chat_requests}) == sorted(prompts)
        assert proxy.peak_in_flight >= 16  # requests were really in flight together

        seen = len(proxy.log)
        rerun = OpenAIOracle(llama_server.model, base_url=proxy.base_url, max_concurrency=32)
        again = rerun.complete(ask(prompts, max_tokens=4))
        assert [r.texts for r in again] == [r.texts for r in results] and all(r.cached for r in again)
        assert len(proxy.log) == seen  # the server side saw nothing at all from the rerun
        assert rerun.usage["requests"] == 0 and rerun.usage["cached"] == 32


def test_logprobs_and_n_from_the_real_server(llama_server):
    oracle = OpenAIOracle(llama_server.model, base_url=llama_server.base_url)
    plain, with_logprobs, sampled = oracle.complete([
        *ask(QUESTIONS[:1], max_tokens=6),
        *ask(QUESTIONS[:1], max_tokens=6, logprobs=True, top_logprobs=3),
        *ask(QUESTIONS[1:2], max_tokens=6, temperature=0.9, n=2, seed=11, logprobs=True),
    ])
    assert plain.ok and plain.logprobs is None and plain.text
    assert with_logprobs.ok and with_logprobs.text == plain.text  # greedy: the same answer
    tokens = with_logprobs.logprobs[0]
    assert "".join(t["token"] for t in tokens).strip() == plain.text.strip()
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 3 for t in tokens)
    assert tokens[0]["top_logprobs"][0]["logprob"] >= tokens[0]["top_logprobs"][-1]["logprob"]
    # llama.cpp ignores n: the oracle fetched the second choice with another call and seed.
    assert sampled.ok and len(sampled.texts) == 2 and len(sampled.logprobs) == 2
