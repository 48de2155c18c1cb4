"""`LlamaCppOracle`: the embedded GGUF through llama.cpp in-process, for real (no mocks), a few short rows."""

import pickle
import re

import pytest

pytest.importorskip("llama_cpp")

from datasets.fingerprint import Hasher  # noqa: E402

from reflectune_hf.oracles import ChatRequest, LlamaCppOracle, TransformersOracle, make_local_oracle  # noqa: E402
from reflectune_hf.oracles.stage_formats import stage_answer_format  # noqa: E402

QUESTIONS = ["Name two fruits.", "What is 2 + 3?", "Say hello in French.", "Name a colour."]


def ask(text, **kw):
    return ChatRequest([{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def oracle():
    oracle = LlamaCppOracle(batch_size=4, max_new_tokens=16, n_ctx=512, n_threads=1, cache=False, progress=False)
    yield oracle
    oracle.close()


def test_greedy_answers_are_deterministic_and_independent_of_the_batch(oracle):
    together = oracle.complete([ask(q) for q in QUESTIONS])
    assert all(r.ok and r.text for r in together)
    alone = oracle.complete([ask(QUESTIONS[1])])[0]  # alone, in another slot, after other sequences
    assert alone.text == together[1].text


def test_answers_keep_the_stage_format(oracle):
    shape = stage_answer_format("response", max_tokens=64)
    requests = [ChatRequest([{"role": "user", "content": f"Improve this answer. Question: {q} Answer: no idea"}],
                            max_tokens=64, answer_format=shape) for q in QUESTIONS[:3]]
    results = LlamaCppOracle(batch_size=4, max_new_tokens=64, n_ctx=512, n_threads=1, cache=False).complete(requests)
    for result in results:
        assert result.ok and re.fullmatch(shape.regex(), result.text), result.text
        assert "[Better Answer]" in result.text and result.text.endswith("[End]")


def test_small_budget_ends_with_length_and_prompt_too_long_fails_its_row(oracle):
    short, long = oracle.complete([ask("Write a long story about a dragon.", max_tokens=3),
                                   ask("word " * 600, max_tokens=8)])
    assert short.ok and short.finish_reasons == ["length"] and short.usage["completion_tokens"] == 3
    assert not long.ok and "raise n_ctx or shorten the row" in long.error


def test_sampling_n_seed_and_logprobs(oracle):
    request = ask("Say hi.", temperature=0.9, n=2, seed=7, max_tokens=6, logprobs=True, top_logprobs=2)
    first, second = oracle.complete([request])[0], oracle.complete([request, ask("Name a colour.")])[0]
    assert len(first.texts) == 2 and first.texts == second.texts  # a seed fixes the sample, whatever the batch
    step = first.logprobs[0][0]
    assert step["logprob"] <= 0 and len(step["top_logprobs"]) == 2
    greedy = oracle.complete([ask("Say hi.", n=3, max_tokens=4)])[0]
    assert len(set(greedy.texts)) == 1 and len(greedy.texts) == 3


def test_cache_hit_on_rerun_sends_nothing(tmp_path):
    kwargs = dict(batch_size=2, max_new_tokens=8, n_ctx=512, n_threads=1, cache=tmp_path / "c.sqlite")
    first = LlamaCppOracle(**kwargs)
    answers = first.complete([ask(q) for q in QUESTIONS[:2]])
    second = LlamaCppOracle(**kwargs)
    again = second.complete([ask(q) for q in QUESTIONS[:2]])
    assert [a.text for a in again] == [a.text for a in answers] and all(a.cached for a in again)
    assert second.usage["requests"] == 0 and getattr(second, "_engine", None) is None  # nothing loaded
    # The other engine keys its own answers: nothing replayed across engines.
    other = TransformersOracle(batch_size=2, max_new_tokens=8, cache=tmp_path / "c.sqlite")
    assert other.cached([ask(q) for q in QUESTIONS[:2]]) == [False, False]


def test_pickling_keeps_the_configuration_and_the_fingerprint_names_the_engine(oracle):
    oracle.complete([ask("Hi", max_tokens=2)])
    copy = pickle.loads(pickle.dumps(oracle))
    assert getattr(copy, "_engine", None) is None and copy.model == oracle.model
    assert copy.batch_size == 16  # a speed knob: outside the fingerprint, the default in a worker
    assert copy.complete([ask("Hi", max_tokens=2)])[0].text == oracle.complete([ask("Hi", max_tokens=2)])[0].text
    copy.close()
    llama, torch_ = make_local_oracle(engine="llamacpp"), make_local_oracle(engine="transformers")
    assert Hasher.hash(llama) != Hasher.hash(torch_)
    assert Hasher.hash(llama) != Hasher.hash(make_local_oracle(engine="llamacpp", weights="gguf"))
    assert Hasher.hash(llama) == Hasher.hash(make_local_oracle(engine="llamacpp", n_threads=3))  # speed only
    assert Hasher.hash(llama) == Hasher.hash(make_local_oracle(engine="llamacpp", prompt_cache_mb=0))
    assert llama._identity()[0] != torch_._identity()[0]  # noqa: SLF001 - the cache keys differ too


def test_structured_off_answers_in_free_text():
    shape = stage_answer_format("response", max_tokens=16)
    oracle = LlamaCppOracle(batch_size=2, max_new_tokens=16, n_ctx=512, n_threads=1, cache=False, structured="off")
    result = oracle.complete([ask("Say hi.", answer_format=shape)])[0]
    assert result.ok and "[Better Answer]" not in result.text


def test_engine_choice():
    assert isinstance(make_local_oracle("smollm2-135m-instruct"), LlamaCppOracle)  # auto: the embedded GGUF
    assert isinstance(make_local_oracle("./some-hf-checkpoint"), TransformersOracle)
    with pytest.raises(ValueError, match="needs a GGUF model"):
        make_local_oracle("./some-hf-checkpoint", engine="llamacpp")
    with pytest.raises(ValueError, match="local_engine must be one of"):
        make_local_oracle(engine="onnx")
    from reflectune_hf.cli.configs import RecycleConfig
    from reflectune_hf.cli.jobs import config_oracle as make_oracle

    assert isinstance(make_oracle(RecycleConfig(oracle_model="local:smollm2-135m-instruct")), LlamaCppOracle)
    chosen = make_oracle(RecycleConfig(oracle_model="local:smollm2-135m-instruct", local_engine="transformers",
                                       local_batch_size=5))
    assert isinstance(chosen, TransformersOracle) and chosen.batch_size == 5


def test_the_reask_of_a_truncated_answer_gets_twice_the_budget():
    """The stage re-asks a `length` answer with twice max_tokens; the local oracle from the CLI
    config must not cap it back to max_new_tokens (it did: the re-ask had the same budget)."""
    from reflectune_hf.cli.configs import RecycleConfig
    from reflectune_hf.cli.jobs import config_oracle as make_oracle
    from reflectune_hf.reflection.stages import ReflectResponse

    for engine in ("llamacpp", "transformers"):
        config = RecycleConfig(oracle_model="local:smollm2-135m-instruct", max_new_tokens=8, local_engine=engine)
        oracle = make_oracle(config)
        stage = ReflectResponse(oracle, max_tokens=config.max_new_tokens)
        first, longer = (stage.request([{"role": "user", "content": "x"}], attempt=a, longer=a == 1) for a in (0, 1))
        assert oracle._prepare(first).max_tokens == 8 and oracle._prepare(longer).max_tokens == 16  # noqa: SLF001


def test_the_f16_re_encode_prints_one_log_line_on_a_fresh_machine(tmp_path):
    """The first use re-encodes the GGUF as F16: one INFO line, none of llama.cpp's ~280 lines
    (`[ 12/ 272] blk... converting to f16`, `llama_model_quantize_impl: ...`) on stdout or
    stderr. A fresh process, as on a fresh machine: llama.cpp's log routing is not set yet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s'); "
            "from reflectune_hf.oracles.llamacpp_local import f16_gguf, source_gguf; "
            "print(f16_gguf(source_gguf('smollm2-135m-instruct')))")
    env = dict(os.environ, REFLECTUNE_HF_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert Path(done.stdout.strip()).is_file() and len(done.stdout.splitlines()) == 1, done.stdout[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("INFO reflectune_hf.oracles.llamacpp_local: Re-encoding SmolLM2"), lines


def test_the_f16_re_encode_is_found_again_after_a_reinstall_and_replaces_earlier_ones(tmp_path, monkeypatch):
    """A reinstalled package has the same GGUF bytes with new mtimes: its F16 re-encode is used
    again, not written anew (each is ~270 MB; clean clones left one per install in the cache).
    Writing a re-encode removes the earlier ones of a source of the same name and size."""
    import os
    import shutil

    import llama_cpp

    from reflectune_hf.oracles.llamacpp_local import f16_gguf, source_gguf

    monkeypatch.setenv("REFLECTUNE_HF_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "pkg" / source_gguf("smollm2-135m-instruct").name
    source.parent.mkdir()
    shutil.copyfile(source_gguf("smollm2-135m-instruct"), source)
    earlier = tmp_path / "cache" / "gguf" / f"{source.stem}-{source.stat().st_size}-1796340948574354362.f16.gguf"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier re-encode")
    unrelated = earlier.with_name("Other-123.f16.gguf")
    unrelated.write_bytes(b"another model's")
    calls = []
    quantize = llama_cpp.llama_model_quantize
    monkeypatch.setattr(llama_cpp, "llama_model_quantize", lambda *a: calls.append(a) or quantize(*a))
    first = f16_gguf(source)
    assert first.is_file() and len(calls) == 1
    assert not earlier.exists() and unrelated.exists()
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))  # a reinstall
    assert f16_gguf(source) == first and len(calls) == 1
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, unrelated.name])


def test_a_failed_re_encode_is_one_line_with_what_llama_cpp_said(tmp_path, monkeypatch, capfd):
    from reflectune_hf.oracles import OracleConfigurationError
    from reflectune_hf.oracles.llamacpp_local import f16_gguf

    monkeypatch.setenv("REFLECTUNE_HF_CACHE", str(tmp_path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not a model")
    with pytest.raises(OracleConfigurationError) as caught:
        f16_gguf(bad)
    message = str(caught.value)
    assert "\n" not in message and "could not re-encode" in message and "weights='gguf'" in message
    assert "failed to" in message, message  # llama.cpp's own words, captured
    assert capfd.readouterr() == ("", "")
    assert not list((tmp_path / "gguf").iterdir())  # no partial file left


def test_a_reasked_prompt_starts_from_its_kept_prefill_with_the_same_answer():
    """A stage's re-ask sends the same prompt again (new seed, higher temperature, more tokens):
    llama.cpp keeps the prompt's KV cells and last logits, so the re-ask decodes no prompt token
    (it prefilled the whole prompt again before), and answers exactly as a fresh engine does."""
    prompt = [{"role": "user", "content": "Improve this answer. Question: Name two fruits. Answer: apple"}]
    first, reask = ChatRequest(prompt, max_tokens=8), ChatRequest(prompt, max_tokens=16, temperature=0.8, seed=3)
    kwargs = dict(batch_size=2, max_new_tokens=16, n_ctx=512, n_threads=1, cache=False, progress=False)
    oracle = LlamaCppOracle(**kwargs)
    oracle.complete([first])
    with oracle.timed_steps() as steps:
        again = oracle.complete([reask])[0]
    fresh = LlamaCppOracle(**kwargs)
    assert again.text == fresh.complete([reask])[0].text
    decoded = sum(step[0] for step in steps.steps)  # tokens through llama_decode: the answer's, no prompt's
    assert decoded <= again.usage["completion_tokens"] < again.usage["prompt_tokens"], (decoded, again.usage)
    oracle.close(), fresh.close()


def test_kept_prompts_are_bounded_and_a_refused_state_is_prefilled_again():
    import numpy as np

    from reflectune_hf.oracles.llamacpp_engine import PromptStates

    logits = np.zeros(4, dtype=np.float32)  # 16 bytes
    states = PromptStates(max_bytes=100)
    states.put([1], b"a" * 30, logits), states.put([2], b"b" * 30, logits)
    states.get([1])  # used last: [2] goes first
    states.put([3], b"c" * 30, logits)
    assert (states.get([2]), len(states), states.bytes) == (None, 2, 92)
    states.put([4], b"d" * 200, logits)  # larger than the whole budget: not kept, nothing evicted
    assert states.get([4]) is None and len(states) == 2
    none = PromptStates(max_bytes=0)  # prompt_cache_mb=0
    none.put([1], b"a", logits)
    assert len(none) == 0 and none.get([1]) is None

    oracle = LlamaCppOracle(batch_size=2, max_new_tokens=6, n_ctx=512, n_threads=1, cache=False, progress=False)
    request = ask("Name a colour.")
    expected = oracle.complete([request])[0].text
    kept = oracle._engine.prompt_states  # noqa: SLF001 - the kept state of this prompt, broken on purpose
    key = next(iter(kept))
    kept.put(key, b"not a llama.cpp state", kept.get(key)[1])
    with oracle.timed_steps() as steps:
        assert oracle.complete([request])[0].text == expected
    assert sum(step[0] for step in steps.steps) > len(key)  # prefilled again
    oracle.close()


def test_the_context_is_part_of_the_cache_key(tmp_path):
    """`n_ctx` caps a long prompt's answer (`length` after what the context leaves): an answer cut
    by a small context was replayed from the cache to an oracle with a larger one. Speed knobs
    (`batch_size`, `n_threads`, `prompt_cache_mb`) stay outside the key."""
    kwargs = dict(max_new_tokens=16, n_threads=1, cache=tmp_path / "c.sqlite", progress=False)
    request = ask("Tell me a story.", max_tokens=16)
    small = LlamaCppOracle(n_ctx=40, **kwargs)
    cut = small.complete([request])[0]
    assert cut.ok and cut.finish_reasons == ["length"] and cut.usage["completion_tokens"] < 16
    small.close()
    assert LlamaCppOracle(n_ctx=512, **kwargs).cached([request]) == [False]
    knobs = LlamaCppOracle(n_ctx=40, batch_size=3, prompt_cache_mb=0, **{**kwargs, "n_threads": 2})
    assert knobs.cached([request]) == [True]


def test_a_negative_seed_is_a_seed_and_fails_no_row(oracle):
    """`ChatRequest` takes negative seeds (as the OpenAI API does); numpy's generator refuses them,
    and the ValueError stopped the decode: every row of the call failed, the unseeded ones too."""
    plain, negative = ask("Name a colour.", max_tokens=4), ask("Say hi.", temperature=0.8, seed=-3, max_tokens=4)
    results = oracle.complete([plain, negative])
    assert all(r.ok for r in results), [r.error for r in results]
    alone = [oracle.complete([negative])[0] for _ in range(2)]
    assert alone[0].ok and alone[0].text == alone[1].text  # a seed: the same sample again


def test_a_request_the_chat_template_cannot_render_fails_its_row_alone(oracle):
    """Content parts and an assistant turn without content are valid `ChatRequest`s that SmolLM2's
    template cannot render: jinja2's error left `complete()`, and every request of the call was lost."""
    parts = ChatRequest([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=4)
    empty = ChatRequest([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}], max_tokens=4)
    plain, bad_parts, bad_empty = oracle.complete([ask("Name a colour.", max_tokens=4), parts, empty])
    assert plain.ok and plain.text
    for bad in (bad_parts, bad_empty):
        assert not bad.ok and "chat template cannot render" in bad.error and "\n" not in bad.error


def test_decoding_stops_on_every_end_of_generation_token_of_the_gguf(oracle, monkeypatch):
    """The stop set was the tokenizer's EOS alone: a chat GGUF whose turn ends with another token
    (Gemma's `<end_of_turn>`, SmolLM2's `<|endoftext|>`) kept generating past it to the budget,
    a `truncated` answer where llama.cpp's server stops."""
    from reflectune_hf.oracles import llamacpp_local

    seen = []
    real = llamacpp_local.run_sequences
    monkeypatch.setattr(llamacpp_local, "run_sequences",
                        lambda *a, eos, **kw: seen.append(eos) or real(*a, eos=eos, **kw))
    assert oracle.complete([ask("Name a colour.", max_tokens=4)])[0].ok
    engine, tokenizer = oracle._load()
    ends = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    assert ends <= engine.eog and ends <= seen[0]


def test_a_decoding_revision_is_part_of_the_cache_key(monkeypatch):
    """Answers cached before the stop set changed (an answer run past `<|endoftext|>`) were replayed."""
    from reflectune_hf.oracles import llamacpp_local

    request = ask("Name a colour.", max_tokens=4)
    before = LlamaCppOracle(cache=False).keys([request])
    monkeypatch.setattr(llamacpp_local, "DECODING_REVISION", llamacpp_local.DECODING_REVISION + 1)
    assert LlamaCppOracle(cache=False).keys([request]) != before
