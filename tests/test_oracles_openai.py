"""OpenAIOracle against a scripted loopback server: faults, configuration errors, concurrency,
contexts (plain, running event loop, Dataset.map with num_proc), kill -9 and resume, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO, free_port

from reflectune_hf.oracles import ChatRequest, OpenAIOracle, Oracle, OracleCache, OracleConfigurationError
from loopback import LoopbackServer


def ask(*prompts, **kwargs) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def fast(monkeypatch):
    """Oracle settings that keep fault tests to seconds (short timeout, two SDK retries)."""
    return dict(timeout=0.6, max_retries=2, max_concurrency=16)


def test_every_fault_comes_back_ok_or_recorded(fast):
    faults = {
        "rate-limited": ["429", "ok"], "err500": ["500", "ok"], "err503": ["503", "503", "ok"],
        "slow-once": ["slow", "ok"], "dropped-once": ["drop", "ok"],
        "malformed-once": ["malformed", "ok"], "no-choices-once": ["no_choices", "ok"],
        "malformed": ["malformed", "no_choices", "malformed"], "always-slow": ["slow"] * 3, "always-500": ["500"] * 3,
        "always-dropped": ["drop"] * 3,
    }
    prompts = list(faults) + [f"fine-{i}" for i in range(6)]
    with LoopbackServer(faults=faults, slow_seconds=2.0) as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, **fast)
        results = oracle.complete(ask(*prompts))
        by_prompt = dict(zip(prompts, results))
        for prompt in ["rate-limited", "err500", "err503", "slow-once", "dropped-once", "malformed-once",
                       "no-choices-once"] + prompts[-6:]:
            assert by_prompt[prompt].ok and by_prompt[prompt].texts == [f"echo: {prompt}"], prompt
        assert "malformed" in by_prompt["malformed"].error and "after 2 retries" in by_prompt["malformed"].error
        assert "timeout" in by_prompt["always-slow"].error
        assert "HTTP 500" in by_prompt["always-500"].error
        assert "connection error" in by_prompt["always-dropped"].error
        assert oracle.usage["failed"] == 4 and oracle.usage["requests"] == len(prompts)

        times = [e["time"] for e in server.chat_requests if e["prompt"] == "rate-limited"]
        assert times[1] - times[0] >= 0.9  # the SDK waited for Retry-After: 1

        # Only successes are cached: a rerun sends exactly the failed rows again.
        before = len(server.chat_requests)
        again = OpenAIOracle("echo", base_url=server.base_url, **fast).complete(ask(*prompts))
        resent = {e["prompt"] for e in server.chat_requests[before:]}
        assert resent == {"malformed", "always-slow", "always-500", "always-dropped"}
        assert [r.cached for r in again] == [r.ok for r in results]


def test_401_raises_at_once_with_a_clear_message():
    with LoopbackServer(api_key="the-right-key") as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, api_key="sk-wrong-key-123")
        with pytest.raises(OracleConfigurationError, match="Authentication failed with HTTP 401") as info:
            oracle.complete(ask(*[f"q{i}" for i in range(50)]))
        assert "sk-wrong-key-123" not in str(info.value)
        assert len(server.chat_requests) == 0  # caught by the GET /models check before any paid call

    # A server whose /models is open but whose chat endpoint refuses: raised on the first answer.
    with LoopbackServer(faults=lambda prompt, attempt: "401") as server:
        with pytest.raises(OracleConfigurationError, match="401"):
            oracle = OpenAIOracle("echo", base_url=server.base_url, max_concurrency=4)
            oracle.complete(ask(*[f"q{i}" for i in range(50)]))
        assert len(server.chat_requests) <= 4


def test_unknown_model_and_unreachable_server_raise():
    with LoopbackServer(faults=lambda prompt, attempt: "404") as server:
        with pytest.raises(OracleConfigurationError, match="unknown model or wrong base_url"):
            OpenAIOracle("no-such-model", base_url=server.base_url).complete(ask("a", "b"))
    start = time.monotonic()
    with pytest.raises(OracleConfigurationError, match="Cannot connect"):
        OpenAIOracle("m", base_url=f"http://127.0.0.1:{free_port()}/v1").complete(ask("a"))
    assert time.monotonic() - start < 10  # not after the full retry schedule of every request


def test_concurrency_is_continuous_not_batched():
    # One slow request must not hold the others back (fixed batches would wait for it).
    with LoopbackServer(latency=0.05, faults={"slow": ["slow"]}, slow_seconds=1.5) as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, max_concurrency=4, timeout=10)
        results = oracle.complete(ask("slow", *[f"q{i}" for i in range(15)]))
        assert all(r.ok for r in results)
        log = server.chat_requests
        slow_start = next(e["time"] for e in log if e["prompt"] == "slow")
        assert max(e["time"] for e in log) < slow_start + 1.5
        assert server.peak_in_flight == 4


def test_a_request_in_retry_backoff_leaves_its_place_on_the_wire():
    """max_concurrency bounds the HTTP exchanges in flight, not the requests: while four requests
    wait out a 429's Retry-After, the others keep all four places busy."""
    limited = [f"r{i}" for i in range(4)]
    with LoopbackServer(latency=0.05, faults={p: ["429"] for p in limited}, retry_after="1") as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, max_concurrency=4, timeout=10)
        results = oracle.complete(ask(*limited, *[f"q{i}" for i in range(12)]))
        assert all(r.ok for r in results)
        log = server.chat_requests
        first_429 = min(e["time"] for e in log if e["action"] == "429")
        assert max(e["time"] for e in log if e["prompt"].startswith("q")) < first_429 + 0.9
        assert [e["prompt"] for e in log].count("r0") == 2 and server.peak_in_flight <= 4


def test_n_choices_are_completed_when_the_server_returns_fewer():
    with LoopbackServer(honor_n=False) as server:  # like llama.cpp: one choice whatever n is
        oracle = OpenAIOracle("echo", base_url=server.base_url)
        [result] = oracle.complete(ask("x", n=3, temperature=0.8, seed=5, logprobs=True, top_logprobs=2))
        assert result.texts == ["echo: x (seed 5)", "echo: x (seed 6)", "echo: x (seed 7)"]
        assert len(result.logprobs) == 3 and result.logprobs[0][0]["token"] == "echo:"
        assert len(result.logprobs[0][0]["top_logprobs"]) == 2
        assert len(server.chat_requests) == 3 and result.usage["completion_tokens"] == 12


def test_duplicates_are_sent_once_and_the_cache_is_keyed_on_the_server():
    with LoopbackServer() as one, LoopbackServer() as two:
        results = OpenAIOracle("echo", base_url=one.base_url).complete(ask("a", "b", "a", "a"))
        assert [r.text for r in results] == ["echo: a", "echo: b", "echo: a", "echo: a"]
        assert len(one.chat_requests) == 2
        OpenAIOracle("echo", base_url=two.base_url).complete(ask("a"))  # same model name, other server
        assert len(two.chat_requests) == 1


def test_complete_works_inside_a_running_event_loop():
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url)

        async def notebook_cell():
            return oracle.complete(ask("from a loop"))

        assert asyncio.run(notebook_cell())[0].text == "echo: from a loop"


class EchoStage:
    """A minimal map stage holding an oracle, as the pipeline's stages do."""

    def __init__(self, oracle):
        self.oracle = oracle

    def __call__(self, batch):
        results = self.oracle.complete(ask(*batch["prompt"]))
        return {"answer": [r.text for r in results], "error": [r.error for r in results]}


def test_dataset_map_with_num_proc_and_a_stable_fingerprint():
    from datasets import Dataset
    from datasets.fingerprint import Hasher

    prompts = [f"row {i}" for i in range(8)]
    with LoopbackServer() as server:
        stage = EchoStage(OpenAIOracle("echo", base_url=server.base_url))
        fingerprint = Hasher.hash(stage)
        ds = Dataset.from_dict({"prompt": prompts})
        out = ds.map(stage, batched=True, batch_size=2, num_proc=2)
        assert out["answer"] == [f"echo: {p}" for p in prompts] and out["error"] == [None] * 8
        assert len(server.chat_requests) == 8
        stage.oracle.complete(ask("used in the parent too"))
        assert Hasher.hash(stage) == fingerprint  # counters and clients are not part of it
        again = ds.map(stage, batched=True, batch_size=4, load_from_cache_file=False)
        assert again["answer"] == out["answer"] and len(server.chat_requests) == 9  # all from the oracle cache


def test_fingerprint_is_the_configuration_only_and_equal_across_processes(monkeypatch):
    from datasets.fingerprint import Hasher

    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-never-pickled")
    oracle = OpenAIOracle("m", base_url="http://127.0.0.1:9/v1")
    assert isinstance(oracle, Oracle)
    code = ("from datasets.fingerprint import Hasher; from reflectune_hf.oracles import OpenAIOracle; "
            "print(Hasher.hash(OpenAIOracle('m', base_url='http://127.0.0.1:9/v1')))")
    env = {**subprocess_env(), "OPENAI_API_KEY": "another-key"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == Hasher.hash(oracle)
    assert Hasher.hash(OpenAIOracle("m2", base_url="http://127.0.0.1:9/v1")) != Hasher.hash(oracle)
    assert Hasher.hash(OpenAIOracle("m", base_url="http://127.0.0.1:10/v1")) != Hasher.hash(oracle)
    assert b"sk-env-key-never-pickled" not in pickle.dumps(oracle)
    explicit = OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", api_key="sk-explicit")
    assert "sk-explicit" not in repr(explicit) and "sk-explicit" not in str(explicit.__dict__)
    assert pickle.loads(pickle.dumps(explicit))._key_value() == "sk-explicit"  # travels to workers


def test_rate_limiter_spreads_requests():
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, requests_per_minute=600)  # 10/s, burst 10
        assert all(r.ok for r in oracle.complete(ask(*[f"q{i}" for i in range(20)])))
        times = [e["time"] for e in server.chat_requests]
        assert max(times) - min(times) >= 0.8


def test_api_key_never_reaches_cache_logs_or_results(tmp_path, caplog):
    secret = "sk-test-LEAKCHECK-0123456789"
    faults = {"flaky": ["500", "ok"], "broken": ["500"] * 3, "garbled": ["malformed"] * 3}
    caplog.set_level(logging.DEBUG)
    with LoopbackServer(api_key=secret, faults=faults) as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, api_key=secret, timeout=2, max_retries=2)
        results = oracle.complete(ask("flaky", "broken", "garbled", "fine"))
        assert [r.ok for r in results] == [True, False, False, True]
        wrong = OpenAIOracle("echo", base_url=server.base_url, api_key=secret[:-1] + "X")
        with pytest.raises(OracleConfigurationError) as info:
            wrong.complete(ask("rejected"))
    cache_files = list(Path(os.environ["REFLECTUNE_HF_ORACLE_CACHE"]).parent.glob("oracle.sqlite*"))
    assert cache_files and len(OracleCache()) == 2
    for path in cache_files:
        assert secret.encode() not in path.read_bytes() and secret[:-1].encode() not in path.read_bytes()
    text = caplog.text + json.dumps([r.to_dict() for r in results]) + repr(oracle) + str(info.value)
    assert secret not in text and secret[:-1] not in text
    assert "Incorrect API key provided: ***" in str(info.value)  # the server's echo was redacted


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from reflectune_hf.oracles import ChatRequest, OpenAIOracle
    oracle = OpenAIOracle("echo", base_url=sys.argv[1], max_concurrency=8, progress=False)
    oracle.complete([ChatRequest([{"role": "user", "content": f"q{i}"}]) for i in range(200)])
""")


def test_kill_9_mid_run_then_rerun_sends_only_the_missing(tmp_path):
    with LoopbackServer(latency=0.05) as server:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, server.base_url], env=subprocess_env())
        deadline = time.monotonic() + 60
        while len(server.chat_requests) < 60 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        answered = {json.loads(r[0])["messages"][0]["content"]
                    for r in OracleCache().execute("SELECT request FROM responses")}
        assert 40 <= len(answered) < 200
        before = len(server.chat_requests)
        oracle = OpenAIOracle("echo", base_url=server.base_url, max_concurrency=8)
        results = oracle.complete(ask(*[f"q{i}" for i in range(200)]))
        resent = [e["prompt"] for e in server.chat_requests[before:]]
        assert all(r.ok for r in results)
        assert len(resent) == 200 - len(answered) and not set(resent) & answered
        assert sum(r.cached for r in results) == len(answered)


def test_credentials_in_base_url_go_as_basic_auth_and_nowhere_else(caplog):
    """`http://user:key@host/v1`: the server gets the credentials as HTTP basic auth (what the HTTP
    library does with a URL's userinfo); `base_url`, repr, logs, errors, keys and the cache do not
    hold them, and a pickled copy (a `num_proc` worker) still sends them."""
    caplog.set_level(logging.DEBUG)
    with LoopbackServer(basic_auth=("me", "pa:ss@word")) as server:
        url = server.base_url.replace("http://", "http://me:pa%3Ass%40word@")
        oracle = OpenAIOracle("echo", base_url=url)
        assert oracle.base_url == server.base_url and oracle.auth == ("me", "pa:ss@word")
        assert [r.text for r in oracle.complete(ask("a"))] == ["echo: a"]
        worker = pickle.loads(pickle.dumps(oracle))
        assert [r.text for r in worker.complete(ask("b"))] == ["echo: b"]
        assert len(server.chat_requests) == 2
        plain = OpenAIOracle("echo", base_url=server.base_url)
        assert plain.keys(ask("a")) == oracle.keys(ask("a"))  # keyed on the server, not on the credentials
        with pytest.raises(OracleConfigurationError, match="401") as info:
            OpenAIOracle("echo", base_url=url.replace("pa%3Ass", "wrong")).complete(ask("c"))
    rows = OracleCache().execute("SELECT * FROM responses")
    text = caplog.text + repr(oracle) + str(info.value) + repr(rows) + str(oracle.__dict__)
    assert len(rows) == 2 and "pa:ss@word" not in text and "pa%3Ass" not in text and "wrong" not in text


def test_errors_that_quote_the_url_credentials_are_redacted():
    oracle = OpenAIOracle("m", base_url="http://me:topsecret@127.0.0.1:9/v1")
    assert oracle._redact("proxy said: bad password topsecret for me:topsecret@host") == \
        "proxy said: bad password *** for ***host"


def test_a_choice_without_text_content_is_a_failure_not_a_cached_empty_answer():
    class NoContent(LoopbackServer):  # OpenAI's refusal under structured output: content null
        def completion(self, body, prompt):
            data = super().completion(body, prompt)
            message = data["choices"][0]["message"]
            if prompt == "refused":
                message.update(content=None, refusal="I can't help with that.")
            elif prompt == "no message":
                del data["choices"][0]["message"]
            return data

    with NoContent() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url)
        refused, missing, fine = oracle.complete(ask("refused", "no message", "fine"))
        assert not refused.ok and "refusal" in refused.error and "can't help" in refused.error
        assert not missing.ok and fine.ok and fine.text == "echo: fine"
        assert oracle.cached(ask("refused", "no message", "fine")) == [False, False, True]
        assert oracle.complete(ask("refused"))[0].error and len(server.chat_requests) == 4


def test_a_usage_that_is_not_an_object_counts_nothing_and_fails_nothing():
    """A server sending `"usage": [...]` (or a number) crashed the whole `complete` call."""
    class OddUsage(LoopbackServer):
        def completion(self, body, prompt):
            data = super().completion(body, prompt)
            data["usage"] = [1, 2] if prompt == "list" else 7
            return data

    with OddUsage() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, cache=False)
        results = oracle.complete(ask("list", "number"))
        assert [r.text for r in results] == ["echo: list", "echo: number"] and all(r.ok for r in results)


def test_an_error_sent_with_http_200_keeps_the_servers_message():
    """A proxy answering `200 {"error": {...}}` failed the row as a bare "malformed response body":
    the server's reason (here a context overflow) was lost."""
    class ErrorAs200(LoopbackServer):
        def completion(self, body, prompt):
            if prompt == "too long":
                return {"error": {"message": "maximum context length is 4096 tokens", "type": "invalid_request_error"}}
            return super().completion(body, prompt)

    with ErrorAs200() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, cache=False, max_retries=0)
        bad, fine = oracle.complete(ask("too long", "fine"))
        assert not bad.ok and "maximum context length is 4096 tokens" in bad.error and "HTTP 200" in bad.error
        assert fine.ok and fine.text == "echo: fine"


def test_an_answer_the_server_ended_on_an_error_is_a_failure_not_a_cached_answer():
    """OpenRouter (an `error` in the choice, `finish_reason: "error"`) and vLLM (`"abort"`: engine
    shutdown, sleep mode) answer HTTP 200 with the partial text: it was `ok` and cached for good."""
    class Aborts(LoopbackServer):
        def completion(self, body, prompt):
            data = super().completion(body, prompt)
            choice = data["choices"][0]
            if prompt == "errored":
                choice.update(finish_reason="error", error={"code": 502, "message": "provider disconnected"})
            elif prompt == "aborted":
                choice.update(finish_reason="abort")
            return data

    with Aborts() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url)
        errored, aborted, fine = oracle.complete(ask("errored", "aborted", "fine"))
        assert not errored.ok and "'error'" in errored.error and "provider disconnected" in errored.error
        assert not aborted.ok and "'abort'" in aborted.error and fine.ok
        assert oracle.cached(ask("errored", "aborted", "fine")) == [False, False, True]


@pytest.mark.parametrize("key", ["sk-secret-abc\n", "sk-secret-abc\r", "sk-secret-é"])
def test_an_api_key_no_header_can_carry_is_refused_without_showing_it(key, monkeypatch, caplog):
    """A key read from a file with its newline was quoted whole in the error and the log
    (`LocalProtocolError: Illegal header value b'Bearer sk-...\\n'`); a non-ASCII one raised a bare
    `UnicodeEncodeError`."""
    from reflectune_hf.oracles import OpenAIBatchOracle

    monkeypatch.setenv("OPENAI_API_KEY", key)
    with LoopbackServer() as server:
        for oracle in (OpenAIOracle("echo", base_url=server.base_url, cache=False),
                       OpenAIBatchOracle("echo", base_url=server.base_url)):
            with pytest.raises(OracleConfigurationError, match="API key .* line break or a non-ASCII") as err:
                oracle.complete(ask("a"))
            assert "sk-secret" not in str(err.value)
        assert not server.log
    assert "sk-secret" not in caplog.text
