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


def test_greedy_text_is_plain_generate_in_fp32(oracle):
    """The decode loop (finished rows leave the batch) gives generate's greedy text, fp32, same batch."""
    import torch

    model, tokenizer = oracle._load()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = [tokenizer.decode(row, skip_special_tokens=True) for row in out[:, inputs["input_ids"].shape[1]:]]
    assert model.dtype == torch.float32
    assert [r.text for r in oracle.complete(ask(PROMPTS))] == expected


def test_the_smaller_budget_wins(oracle):
    """A stage's max_tokens never overrides the oracle's own max_new_tokens, nor the reverse."""
    short = TransformersOracle(batch_size=3, max_new_tokens=3, cache=False)
    short._model, short._tokenizer = oracle._load()
    assert short._prepare(ask(PROMPTS[:1], max_tokens=512)[0]).max_tokens == 3
    assert short._prepare(ask(PROMPTS[:1])[0]).max_tokens == 3
    assert oracle._prepare(ask(PROMPTS[:1], max_tokens=2)[0]).max_tokens == 2
    results = short.complete(ask(PROMPTS, max_tokens=512))
    assert all(r.ok and r.usage["completion_tokens"] <= 3 for r in results)
    assert [r.text for r in results] == [r.text for r in oracle.complete(ask(PROMPTS, max_tokens=3))]


def test_budget_is_capped_by_the_context_window(oracle, monkeypatch):
    """min(max_tokens, context - prompt): a long row gets a shorter answer, not an error."""
    model, tokenizer = oracle._load()
    [request] = ask(PROMPTS[:1], max_tokens=12)
    prompt_tokens = len(tokenizer(tokenizer.apply_chat_template(request.message_dicts, add_generation_prompt=True,
                                                                tokenize=False), add_special_tokens=False)["input_ids"])
    monkeypatch.setattr(model.config, "max_position_embeddings", prompt_tokens + 4)
    [result] = oracle.complete([request])
    assert result.ok and result.usage["prompt_tokens"] == prompt_tokens
    assert result.usage["completion_tokens"] <= 4
    monkeypatch.setattr(model.config, "max_position_embeddings", prompt_tokens)
    [full] = oracle.complete([request])
    assert not full.ok and "exceeds the model's context" in full.error and "shorten the row" in full.error


def test_progress_bar_advances_per_request(oracle, capsys):
    """One bar per call, counting requests (not batches), shown as soon as two requests are generated."""
    oracle.complete(ask(["Say yes.", "Say no."], max_tokens=2))
    err = capsys.readouterr().err
    assert "0/2" in err and "req" in err


def test_cache_identity_and_fingerprint_follow_one_model_identity_rule(tmp_path):
    """The cache key and the datasets fingerprint read a model directory by the same rule
    (`models.model_identity`): a changed tokenizer file changes both (#19.2)."""
    from reflectune_hf.oracles import TransformersOracle

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.model").write_bytes(b"v1")

    def identities():
        oracle = TransformersOracle(str(model), cache=False)
        return oracle._identity()[0], oracle.fingerprint_identity()["weights"]

    key, weights = identities()
    (model / "tokenizer.model").write_bytes(b"version 2")
    new_key, new_weights = identities()
    assert new_weights != weights
    assert new_key != key
    assert str(model.resolve()) in new_key


def test_seeded_requests_share_a_batch_and_sample_as_they_do_alone(oracle, monkeypatch):
    """The stages' re-asks are sampled with a seed; each seeded request was decoded alone (a
    batch of one per request: with `--local_engine transformers` the re-asks ran one after another).
    Now they share a batch, each drawing from its own generator: the same samples as alone."""
    from reflectune_hf.oracles import local_decode

    requests = [*ask(PROMPTS, max_tokens=6, temperature=1.0, seed=3),
                *ask(PROMPTS[:1], max_tokens=6, temperature=1.0, seed=4)]
    calls = []
    real = local_decode.decode
    monkeypatch.setattr(local_decode, "decode", lambda model, prompts, *a, **k: calls.append(len(prompts)) or
                        real(model, prompts, *a, **k))
    together = oracle.complete(requests)
    assert calls == [3, 1]  # batch_size 3: three seeded requests in one batch
    alone = [oracle.complete([r])[0] for r in requests]
    assert [r.texts for r in together] == [r.texts for r in alone]


def test_a_request_the_chat_template_cannot_render_fails_its_row_alone(oracle):
    """A content-part list is a valid `ChatRequest` that SmolLM2's template cannot render: jinja2's
    error left `complete()`, and every request of the call was lost."""
    parts = ChatRequest([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=4)
    plain, bad = oracle.complete([*ask(PROMPTS[:1], max_tokens=4), parts])
    assert plain.ok and plain.text
    assert not bad.ok and "chat template cannot render" in bad.error
