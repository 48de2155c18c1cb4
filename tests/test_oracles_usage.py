"""Cost estimates before sending: local token counts, prices, cache-aware oracle estimates."""

from __future__ import annotations

import pytest

from reflectune_hf.oracles import ChatRequest, ChatResult, OpenAIOracle, estimate


def ask(*prompts, **kwargs):
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


class WordTokenizer:
    """tiktoken-style: encode(text) only."""

    def encode(self, text):
        return text.split()


def test_counts_and_prices():
    reqs = ask("one two three", "four five", max_tokens=10) + ask("six", n=2)
    est = estimate(reqs, prices={"input": 1.0, "output": 2.0}, tokenizer=WordTokenizer())
    assert est.prompt_tokens == (3 + 3 + 3) + (3 + 3 + 2) + (3 + 3 + 1)  # priming + per message + words
    assert est.output_tokens == 10 + 10 + 2 * 512 and est.requests == 3
    assert est.cost == pytest.approx((est.prompt_tokens * 1.0 + est.output_tokens * 2.0) / 1e6)
    assert estimate(reqs, tokenizer=WordTokenizer(), expected_output_tokens=5).output_tokens == 20
    assert estimate(reqs, tokenizer=WordTokenizer()).cost is None
    with pytest.raises(ValueError, match="per million"):
        estimate(reqs, prices={"prompt": 1.0}, tokenizer=WordTokenizer())
    real = estimate(ask("The quick brown fox jumps over the lazy dog."))  # the embedded tokenizer, offline
    assert 8 <= real.prompt_tokens - 6 <= 14 and real.tokenizer == "smollm2-135m-instruct"


def test_oracle_estimate_leaves_out_cached_and_duplicate_requests():
    oracle = OpenAIOracle("m", base_url="http://127.0.0.1:9/v1")
    reqs = ask("a", "b", "b", "c", max_tokens=4)
    [key_a] = oracle.keys(reqs[:1])
    oracle.cache_store.put(key_a, ChatResult(texts=["cached"]))
    est = oracle.estimate(reqs, tokenizer=WordTokenizer())
    assert (est.requests, est.cached_requests, est.duplicate_requests) == (2, 1, 1)
    assert oracle.cached(reqs) == [True, False, False, False]
    assert oracle.complete(reqs[:1])[0].text == "cached"  # nothing sent: the server does not even exist
