"""TransformersOracle with the embedded SmolLM2: batched greedy and sampled generation, logprobs."""

from __future__ import annotations

import pytest

from reflectune_hf.oracles import ChatRequest, TransformersOracle

PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Count to three."]


def ask(prompts, **kwargs):
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


@pytest.fixture(scope="module")
def oracle(smollm2_dir):
    return TransformersOracle(batch_size=3, max_new_tokens=12, cache=False)


def test_batched_greedy_matches_one_by_one_and_is_cached(oracle, smollm2_dir):
    batched = oracle.complete(ask(PROMPTS))
    assert all(r.ok and r.text.strip() for r in batched)
    assert all(r.finish_reasons[0] in ("stop", "length") and r.usage["completion_tokens"] <= 12 for r in batched)
    single = TransformersOracle(batch_size=1, max_new_tokens=12, cache=False)
    single._model, single._tokenizer = oracle._load()  # same weights, no second load
    assert [r.text for r in single.complete(ask(PROMPTS))] == [r.text for r in batched]  # left padding is right

    cached = TransformersOracle(batch_size=3, max_new_tokens=12)  # default cache on
    cached._model, cached._tokenizer = oracle._load()
    first = cached.complete(ask(PROMPTS[:1]))
    again = TransformersOracle(batch_size=3, max_new_tokens=12).complete(ask(PROMPTS[:1]))  # never loads the model
    assert again[0].cached and again[0].texts == first[0].texts == batched[0].texts


def test_logprobs_and_n(oracle):
    greedy, sampled, sampled_again = oracle.complete([
        *ask(PROMPTS[:1], max_tokens=6, logprobs=True, top_logprobs=3, n=2),
        *ask(PROMPTS[1:2], max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=True),
        *ask(PROMPTS[1:2], max_tokens=6, temperature=1.0, n=3, seed=7),
    ])
    assert greedy.texts[0] == greedy.texts[1] and len(greedy.logprobs) == 2
    for entry in greedy.logprobs[0]:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy picks the most likely token
    assert "".join(e["token"] for e in greedy.logprobs[0]) == greedy.texts[0]
    assert len(sampled.texts) == 3 and len(sampled.logprobs) == 3 and sampled_again.logprobs is None
    assert sampled.texts == sampled_again.texts  # a seed makes sampling reproducible, batch or not


def test_fingerprint_and_overlong_rows(oracle):
    from datasets.fingerprint import Hasher

    fresh = TransformersOracle(batch_size=3, max_new_tokens=12, cache=False)
    assert Hasher.hash(fresh) == Hasher.hash(oracle)  # a loaded model is not part of the fingerprint
    assert Hasher.hash(TransformersOracle(model="other", cache=False)) != Hasher.hash(oracle)
    [result] = oracle.complete(ask(["word " * 9000], max_tokens=4))
    assert not result.ok and "exceeds the model's context" in result.error
