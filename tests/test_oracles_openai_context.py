"""`OpenAIOracle(context_window=...)`: each request's completion budget is
`min(max_tokens, context_window - prompt_tokens)`, as the reference computes it; a prompt that
does not fit is not sent. Checked on the `max_tokens` a loopback server receives."""

from __future__ import annotations

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIOracle
from reflectune_hf.oracles.budget import PromptCounter, estimate_prompt_tokens
from loopback import LoopbackServer


def ask(text: str, max_tokens=64) -> ChatRequest:
    return ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                       max_tokens=max_tokens)


def received(server) -> dict:
    return {e["prompt"]: e["body"].get("max_tokens") for e in server.chat_requests}


def test_long_rows_get_a_smaller_budget_and_rows_that_cannot_fit_are_not_sent():
    short, medium, huge = "Hi.", "word " * 100, "word " * 400  # estimates: 30, 279, 1029 tokens
    assert [estimate_prompt_tokens(ask(t).message_dicts) for t in (short, medium, huge)] == [30, 279, 1029]
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, context_window=300)
        results = oracle.complete([ask(short), ask(medium), ask(huge), ask("Hello.", max_tokens=None)])
        assert [r.ok for r in results] == [True, True, False, True]
        assert received(server) == {short: 64, medium: 300 - 279, "Hello.": None}  # None: the server's default
        assert results[2].error.startswith("prompt of 1029 tokens (estimated) does not fit the context window of 300")
        assert "context_tokenizer" in results[2].error
        sent = len(server.chat_requests)

        # The cache key is the request as sent: a rerun computes the same budgets and sends nothing
        # but the row that cannot fit (failures are never cached; it is refused again, unsent).
        again = OpenAIOracle("echo", base_url=server.base_url, context_window=300).complete(
            [ask(short), ask(medium), ask(huge)])
        assert [r.cached for r in again] == [True, True, False] and len(server.chat_requests) == sent
        # A row whose budget is not cut keeps the key it has without context_window.
        plain = OpenAIOracle("echo", base_url=server.base_url)
        assert plain.keys([ask(short)]) == oracle.keys([ask(short)])
        assert plain.keys([ask(medium)]) != oracle.keys([ask(medium)])
        assert oracle.keys([ask(medium)]) == plain.keys([ask(medium, max_tokens=21)])


def test_an_exact_count_with_the_tokenizer(smollm2_dir):
    from reflectune_hf.models import load_tokenizer

    text = "Explain photosynthesis in one sentence. " * 20
    ids = load_tokenizer("smollm2-135m-instruct").apply_chat_template(ask(text).message_dicts, tokenize=True,
                                                                         add_generation_prompt=True)
    exact = len(ids["input_ids"] if not isinstance(ids, list) else ids)
    assert PromptCounter("smollm2-135m-instruct").count(ask(text)) == exact
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, context_window=exact + 10,
                              tokenizer="smollm2-135m-instruct")
        fits, too_long = oracle.complete([ask(text), ask(text + " More words." * 10)])
        assert fits.ok and received(server) == {text: 10}
        assert not too_long.ok and "does not fit the context window" in too_long.error
        assert "(estimated)" not in too_long.error and len(server.chat_requests) == 1


def test_context_window_is_checked_and_pickles_to_its_configuration():
    import pickle

    with pytest.raises(ValueError, match="context_window must be an integer >= 1"):
        OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", context_window=0)
    with pytest.raises(TypeError, match="tokenizer must be a model name"):
        OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", context_window=8, tokenizer=object())
    oracle = OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", context_window=512, tokenizer="smollm2-135m-instruct")
    oracle.prompt_counter._memo = {"big": 1}
    copy = pickle.loads(pickle.dumps(oracle))
    assert copy.context_window == 512 and copy.prompt_counter.tokenizer == "smollm2-135m-instruct"
    assert copy.prompt_counter._memo is None


def test_a_tokenizer_that_cannot_count_raises_at_once_instead_of_failing_every_row(smollm2_dir, tmp_path):
    from reflectune_hf.models import load_tokenizer
    from reflectune_hf.oracles import OracleConfigurationError

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    for path in (tmp_path / "plain").glob("*chat_template*"):
        path.unlink()
    with LoopbackServer() as server:
        for name, match in ((str(tmp_path / "plain"), "has no chat template"),
                            (str(tmp_path / "missing"), "cannot load the tokenizer")):
            oracle = OpenAIOracle("echo", base_url=server.base_url, context_window=300, tokenizer=name)
            with pytest.raises(OracleConfigurationError, match=match) as info:
                oracle.complete([ask("Hi."), ask("Hello.")])
            assert "\n" not in str(info.value)
        assert server.chat_requests == []
