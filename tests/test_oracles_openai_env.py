"""OpenAIOracle set-up: the tokens-per-minute limiter, settings read from the environment, and the
openai SDK's HTTP library found whatever it is called (httpx2 in openai 3.x, httpx before)."""

from __future__ import annotations

import asyncio
import sys
import time
from types import SimpleNamespace

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIOracle, OracleConfigurationError, RateLimiter
from reflectune_hf.oracles import runtime
from loopback import LoopbackServer
from reflectune_hf.oracles.http import http_response_class
from reflectune_hf.oracles.runtime import token_guess as _token_guess


def ask(*prompts, **kwargs) -> list[ChatRequest]:
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


class FakeClock:
    """`time.monotonic` and `asyncio.sleep` for the limiter: sleeping moves the clock, instantly.

    Like a real clock it always moves on (by at least a microsecond): a wait of 1e-17 s left by
    rounding would otherwise never end.
    """

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 1e-6)
        await asyncio.sleep(0)


def near(values):
    return pytest.approx(values, abs=1e-4)


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(runtime, "asyncio", SimpleNamespace(Lock=asyncio.Lock, sleep=fake.sleep))
    return fake


def departures(clock, limiter_args: dict, tokens: list, concurrent: bool = False) -> list:
    """The clock time at which each `acquire(tokens[i])` was granted."""
    async def run():
        limiter = RateLimiter(**limiter_args)
        granted = [None] * len(tokens)

        async def one(i):
            await limiter.acquire(tokens[i])
            granted[i] = clock.now

        if concurrent:
            await asyncio.gather(*(one(i) for i in range(len(tokens))))
        else:
            for i in range(len(tokens)):
                await one(i)
        return granted

    return asyncio.run(run())


def test_tokens_per_minute_spaces_requests_by_their_tokens(clock):
    # 6000 tokens/min = 100 tokens/s, burst 100: five 20-token requests at once, then one per 0.2 s.
    times = departures(clock, {"tokens_per_minute": 6000}, [20] * 10)
    assert times == near([0.0] * 5 + [0.2, 0.4, 0.6, 0.8, 1.0])
    for t in times:  # never more tokens out by time t than the burst plus what the rate refilled
        assert 20 * sum(u <= t + 1e-9 for u in times) <= 100 + 100 * t + 1e-3
    # Bigger requests wait longer; one over the burst waits for a full bucket and owes the rest.
    start = clock.now
    assert departures(clock, {"tokens_per_minute": 6000}, [50, 50, 50, 250, 10]) == near(
        [start + d for d in (0.0, 0.0, 0.5, 1.5, 3.1)])


def test_concurrent_acquires_are_served_in_order_and_the_stricter_budget_wins(clock):
    times = departures(clock, {"tokens_per_minute": 6000}, [20] * 10, concurrent=True)
    assert times == near([0.0] * 5 + [0.2, 0.4, 0.6, 0.8, 1.0])
    start = clock.now  # 60 requests/min allows one per second: stricter than the tokens here
    assert departures(clock, {"requests_per_minute": 60, "tokens_per_minute": 6000}, [20] * 4) == near(
        [start + d for d in (0.0, 1.0, 2.0, 3.0)])
    start = clock.now  # ... and here the tokens are the stricter budget
    assert departures(clock, {"requests_per_minute": 6000, "tokens_per_minute": 600}, [10] * 3) == near(
        [start + d for d in (0.0, 1.0, 2.0)])


def test_oracle_with_a_tiny_token_budget_takes_at_least_the_computed_time():
    requests = ask(*[f"q{i}" for i in range(10)], max_tokens=16)
    assert {_token_guess(r, 1) for r in requests} == {20}  # 4 per message + max_tokens (the prompt is tiny)
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, tokens_per_minute=6000, max_concurrency=32)
        start = time.time()
        results = oracle.complete(requests)
        assert all(r.ok for r in results) and len(server.chat_requests) == 10
        # Five leave at once (burst 100 tokens), the tenth 5 x 20 tokens / 100 tokens/s = 1.0 s later.
        assert max(e["time"] for e in server.chat_requests) - start >= 0.95


def test_base_url_and_api_key_are_read_from_the_environment(monkeypatch):
    secret = "sk-from-the-environment-0123"
    with LoopbackServer(api_key=secret) as server, LoopbackServer(api_key="explicit") as other:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/")
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        oracle = OpenAIOracle("echo")
        assert oracle.base_url == server.base_url and secret not in repr(oracle)
        assert [r.text for r in oracle.complete(ask("a", "b"))] == ["echo: a", "echo: b"]
        assert len(server.chat_requests) == 2
        # The same server named explicitly shares the cache: nothing is sent again.
        assert OpenAIOracle("echo", base_url=server.base_url).complete(ask("a"))[0].cached
        # Arguments win over the environment.
        assert OpenAIOracle("echo", base_url=other.base_url, api_key="explicit").complete(ask("c"))[0].ok
        assert len(server.chat_requests) == 2 and len(other.chat_requests) == 1
        # The key is read when requests are sent (in each process), not when the oracle is built.
        late = OpenAIOracle("echo")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key")
        with pytest.raises(OracleConfigurationError, match="Authentication failed with HTTP 401"):
            late.complete(ask("d"))
        assert len(server.chat_requests) == 2
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert OpenAIOracle("gpt-4o-mini").base_url == "https://api.openai.com/v1"
    with pytest.raises(OracleConfigurationError, match="No API key for OpenAI"):
        OpenAIOracle("gpt-4o-mini")._key_value()


def test_a_base_url_with_a_bad_port_is_refused_when_the_oracle_is_built():
    """A mistyped port (`:80000`) built the oracle, then `complete` died in the socket layer with an
    `ExceptionGroup` around `OverflowError: connect(): port must be 0-65535`."""
    with pytest.raises(ValueError, match=r"base_url has a bad port \(127\.0\.0\.1:80000") as err:
        OpenAIOracle("m", base_url="http://me:s3cret@127.0.0.1:80000/v1")
    assert "s3cret" not in str(err.value)


@pytest.fixture
def fresh_response_class():
    http_response_class.cache_clear()
    yield
    http_response_class.cache_clear()


def test_the_sdk_http_library_is_found_whatever_its_name(monkeypatch, fresh_response_class):
    import openai._base_client as base_client

    used = getattr(base_client, "httpx2", None) or base_client.httpx
    assert http_response_class() is used.Response
    # An older SDK (openai 2.x) is built on `httpx`, and `httpx2` may not be installed at all.
    legacy = type("Response", (), {})
    monkeypatch.delattr(base_client, "httpx2", raising=False)
    monkeypatch.setattr(base_client, "httpx", SimpleNamespace(Response=legacy), raising=False)
    monkeypatch.setitem(sys.modules, "httpx2", None)
    http_response_class.cache_clear()
    assert http_response_class() is legacy


def test_requests_do_not_import_httpx2_by_name(monkeypatch, fresh_response_class):
    monkeypatch.setitem(sys.modules, "httpx2", None)  # `import httpx2` raises ImportError from now on
    with LoopbackServer() as server:
        results = OpenAIOracle("echo", base_url=server.base_url).complete(ask("a", "b"))
    assert [r.text for r in results] == ["echo: a", "echo: b"]
