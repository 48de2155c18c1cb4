"""`OpenAIOracle`: any OpenAI-compatible chat server (OpenAI, vLLM, TGI, Ollama, llama.cpp).

Requests run with continuous concurrency: `max_concurrency` requests are always in flight (a
pool of workers, not fixed batches that wait for their slowest member). Retries,
backoff, `Retry-After` and timeouts are the openai SDK's own (`max_retries`, `timeout`); an
optional limiter spaces requests under a requests-per-minute and tokens-per-minute budget.
Every success is written to the `OracleCache` at once, so an interrupted run resumes where it
stopped and a rerun sends nothing.

A configuration error raises `OracleConfigurationError` at once: authentication refused
(401/403), unknown model or wrong path (404), a server that cannot be reached (checked once per
process with `GET /models`, and again when many requests in a row cannot connect). Anything
else is one row's failure: a `ChatResult` with `error` set, not cached, sent again by a rerun.

Works with openai 2.x (built on `httpx`) and 3.x (built on `httpx2`): the HTTP library is taken
from the SDK itself (`oracles.http`), never imported by a fixed name. `max_concurrency` bounds
the HTTP exchanges on the wire; twice as many workers run, so a request sleeping in the SDK's
retry backoff does not keep one of those places idle.

Example:
    >>> from reflectune_hf.oracles import ChatRequest, OpenAIOracle
    >>> oracle = OpenAIOracle("smollm2-135m-instruct", base_url="http://127.0.0.1:8080/v1")  # doctest: +SKIP
    >>> requests = [ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=8)]
    >>> [r.text for r in oracle.complete(requests)]  # doctest: +SKIP
    ['Hello! How can I help you today?']
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Optional
from urllib.parse import urlsplit

from . import backends
from .base import ChatRequest, ChatResult, OracleConfigurationError, content_text, usage_add
from .http import http_response_class, in_flight_client
from .cache import CachingOracle, redact_url

logger = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"


def run_sync(factory):
    """Run the coroutine made by `factory()` to completion from synchronous code.

    Uses `asyncio.run` when no event loop runs in this thread; inside a running loop (Jupyter,
    an async application) the coroutine runs on a private loop in a worker thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1, thread_name_prefix="reflectune-oracle") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class Secret:
    """A string that never shows itself in `repr`/`str` (API keys)."""

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class RateLimiter:
    """Token buckets for requests per minute and tokens per minute, refilled continuously.

    The burst is one second's worth of budget (at least one request), so requests are spread
    over the minute instead of all leaving at once and meeting 429s.
    """

    def __init__(self, requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None):
        self.rates = {"requests": requests_per_minute, "tokens": tokens_per_minute}
        self.capacity = {name: max(1.0, rate / 60.0) for name, rate in self.rates.items() if rate}
        self.level = dict(self.capacity)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float) -> None:
        need = {"requests": 1.0, "tokens": float(tokens)}
        async with self._lock:  # first come, first served
            while True:
                now = time.monotonic()
                for name, cap in self.capacity.items():
                    self.level[name] = min(cap, self.level[name] + (now - self.stamp) * self.rates[name] / 60.0)
                self.stamp = now
                wait = max([(min(need[n], cap) - self.level[n]) * 60.0 / self.rates[n]
                            for n, cap in self.capacity.items()] + [0.0])
                if wait <= 0:
                    for name in self.capacity:
                        self.level[name] -= need[name]
                    return
                await asyncio.sleep(wait)


def _token_guess(request: ChatRequest, n: int) -> int:
    """A cheap upper-side token count for the TPM limiter (4 characters per token)."""
    prompt = sum(len(content_text(m.get("content"))) for m in request.message_dicts) // 4 + 4 * len(request.messages)
    return prompt + (request.max_tokens or 256) * n


def parse_logprobs(choice: dict) -> Optional[list]:
    """OpenAI-style `choice.logprobs.content` as `[{"token", "logprob", "top_logprobs"}]`."""
    content = (choice.get("logprobs") or {}).get("content")
    if content is None:
        return None
    return [
        {
            "token": item.get("token"),
            "logprob": item.get("logprob"),
            "top_logprobs": [{"token": t.get("token"), "logprob": t.get("logprob")}
                             for t in item.get("top_logprobs") or []],
        }
        for item in content
    ]


def _parse_choices(data: dict, want: int, with_logprobs: bool) -> list[tuple]:
    """`(text, finish_reason, logprobs)` of up to `want` choices; ValueError when unusable."""
    choices = data.get("choices")
    if not choices:
        raise ValueError("no choices")
    got = []
    for choice in choices[:want]:
        parsed = parse_logprobs(choice) if with_logprobs else None
        if with_logprobs and parsed is None:
            raise ValueError("the server returned no logprobs although logprobs=True was asked")
        got.append(((choice.get("message") or {}).get("content") or "", choice.get("finish_reason"), parsed))
    return got


class OpenAIOracle(backends.StructuredOutput, CachingOracle):
    """Chat completions from any OpenAI-compatible server, cached per request.

    Args:
        model: the model name the server knows.
        base_url: the server, e.g. `http://127.0.0.1:8000/v1` (vLLM, TGI, Ollama, llama.cpp);
            default `$OPENAI_BASE_URL`, else OpenAI. Part of every cache key.
        api_key: default `$OPENAI_API_KEY`, read in each process and never pickled. A key passed
            here travels to `num_proc` workers inside the pickled oracle (so it enters the
            `datasets` fingerprint hash) but never appears in `repr`, logs, the cache or results.
            Local servers need none.
        max_concurrency: requests in flight at once (per process: `num_proc=N` multiplies it).
        timeout: seconds per HTTP attempt. max_retries: the SDK's retries (429, 408, 409, 5xx,
            timeouts, dropped connections; honours `Retry-After`). Logged at debug level.
        requests_per_minute, tokens_per_minute: optional client-side budget (per process).
        cache: True (default cache file), False, a path or an `OracleCache`.
        progress: show a tqdm bar; None shows it for runs of more than 64 requests.
        backend: `"auto"` (recognise the server once per process: `oracles.backends`),
            `"llamacpp"`, `"vllm"`, `"openai"` or `"plain"`. structured: `"auto"` (enforce a
            request's `answer_format` where the backend can, free text with one logged note where
            it cannot), `"on"` (raise `OracleConfigurationError` where it cannot) or `"off"`.
            vllm_fields: `"auto"` (from vLLM's `/version`), `"structured_outputs"` (vLLM >=
            0.10.2) or `"guided"` (`guided_regex`, vLLM < 0.12); vllm_format: `"regex"` or `"json"`.

    The pickled state (hence the `datasets` fingerprint) is this configuration only: clients,
    event loops, connections and usage counters are rebuilt lazily in each process.

    Example:
        >>> from reflectune_hf.oracles import OpenAIOracle
        >>> oracle = OpenAIOracle("gpt-4o-mini", base_url="http://127.0.0.1:8000/v1", api_key="sk-x")
        >>> "sk-x" in repr(oracle)
        False
    """

    _transient: ClassVar[tuple[str, ...]] = CachingOracle._transient + ("_reached_pid", "_connect_failures")

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 max_concurrency: int = 32, timeout: float = 120.0, max_retries: int = 6,
                 requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None,
                 cache=True, progress: Optional[bool] = None, backend: str = "auto", structured="auto",
                 vllm_fields: str = "auto", vllm_format: str = "regex"):
        if not model:
            raise ValueError("model is required (the name the server knows the model by)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model = str(model)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self._api_key = Secret(api_key) if api_key else None
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.cache = cache
        self.progress = progress
        self._set_structured(backend, structured, vllm_fields, vllm_format)

    def __repr__(self) -> str:
        return (f"OpenAIOracle(model={self.model!r}, base_url={redact_url(self.base_url)!r}, "
                f"max_concurrency={self.max_concurrency})")

    def _identity(self) -> tuple[str, str]:
        return self.model, self.base_url

    @property
    def _is_openai(self) -> bool:
        return (urlsplit(self.base_url).hostname or "").endswith("api.openai.com")

    def _key_value(self) -> str:
        if self._api_key is not None:
            return self._api_key.value
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            return key
        if self._is_openai:
            raise OracleConfigurationError("No API key for OpenAI: set OPENAI_API_KEY or pass api_key=...")
        return "not-needed"  # local servers accept any key

    def _redact(self, text: str) -> str:
        key = self._api_key.value if self._api_key is not None else os.environ.get("OPENAI_API_KEY")
        return text.replace(key, "***") if key else text

    def _client(self, stop: Optional[asyncio.Event] = None):
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self._key_value(), base_url=self.base_url, timeout=self.timeout,
                           max_retries=self.max_retries, http_client=in_flight_client(self.max_concurrency, stop))

    # -- sending ------------------------------------------------------------------------------
    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        self._detect_backend(requests)
        return run_sync(lambda: self._run(requests, on_result))

    async def _run(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        from tqdm.auto import tqdm

        results: list[Optional[ChatResult]] = [None] * len(requests)
        order = iter(range(len(requests)))
        limiter = (RateLimiter(self.requests_per_minute, self.tokens_per_minute)
                   if self.requests_per_minute or self.tokens_per_minute else None)
        show = self.progress if self.progress is not None else len(requests) > 64
        bar = tqdm(total=len(requests), desc=f"oracle {self.model}", unit="req", disable=not show)

        stop = asyncio.Event()  # set on a configuration error: no further request is sent

        async def worker(client) -> None:
            try:
                for i in order:  # a shared iterator: each worker takes the next request when free
                    results[i] = await self._one(client, requests[i], limiter)
                    on_result(i, results[i])
                    bar.update(1)
            except OracleConfigurationError:
                stop.set()
                raise

        try:
            async with self._client(stop) as client:
                await self._check_reachable(client)
                workers = min(2 * self.max_concurrency, len(requests))  # half may be in retry backoff
                tasks = [asyncio.ensure_future(worker(client)) for _ in range(workers)]
                try:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                    for task in tasks:
                        if task.done() and not task.cancelled() and task.exception() is not None:
                            raise task.exception()
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            bar.close()
        return results

    async def _check_reachable(self, client) -> None:
        """Once per process: `GET /models` to fail fast on a dead server or a refused key."""
        import openai

        self._connect_failures = 0
        if getattr(self, "_reached_pid", None) == os.getpid():
            return
        try:
            await client.with_options(max_retries=1, timeout=min(self.timeout, 30.0)).models.with_raw_response.list()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise OracleConfigurationError(self._explain(err)) from None
        except openai.APITimeoutError:
            pass  # slow, not dead: the requests themselves will tell
        except openai.APIConnectionError as err:
            raise OracleConfigurationError(
                f"Cannot connect to {redact_url(self.base_url)} ({self._cause(err)}). Is the server running and "
                "is base_url right (it usually ends in /v1)?") from None
        except openai.OpenAIError:
            pass  # many servers have no /models; the requests will show any real problem
        self._reached_pid = os.getpid()

    @staticmethod
    def _cause(err: BaseException) -> str:
        while err.__cause__ is not None:
            err = err.__cause__
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__

    def _explain(self, err) -> str:
        status = getattr(err, "status_code", None)
        detail = self._redact(getattr(err, "message", "") or str(err))
        where = f"{redact_url(self.base_url)} (model {self.model!r})"
        if status in (401, 403):
            return f"Authentication failed with HTTP {status} at {where}: check the API key (OPENAI_API_KEY). {detail}"
        return f"HTTP {status} at {where}: unknown model or wrong base_url. {detail}"

    def _body(self, request: ChatRequest, n: int, seed: Optional[int]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": request.message_dicts,
                                "temperature": request.temperature, "top_p": request.top_p}
        if request.max_tokens is not None:
            body["max_completion_tokens" if self._is_openai else "max_tokens"] = request.max_tokens
        if n > 1:
            body["n"] = n
        if request.logprobs:
            # An explicit 0: llama.cpp returns no logprobs at all without top_logprobs.
            body["logprobs"], body["top_logprobs"] = True, request.top_logprobs or 0
        if seed is not None:
            body["seed"] = seed
        if request.answer_format is not None:
            body.update(self._structured(request)[0])
        return body

    async def _one(self, client, request: ChatRequest, limiter: Optional[RateLimiter]) -> ChatResult:
        """One request, with extra calls when the server returns fewer than `n` choices."""
        texts, reasons, logprobs, usage = [], [], [], {}
        calls = 0
        while len(texts) < request.n:
            want = request.n - len(texts)
            seed = None if request.seed is None else request.seed + calls
            if limiter is not None:
                await limiter.acquire(_token_guess(request, want))
            data = await self._call(client, self._body(request, want, seed))
            if isinstance(data, ChatResult):
                return data
            try:
                got = _parse_choices(data, want, request.logprobs)
            except (AttributeError, TypeError, KeyError, ValueError) as err:
                return ChatResult.failure(f"malformed response: {err}")
            for (text, reason, parsed) in got:
                texts.append(self._decode(request, text))
                reasons.append(reason)
                logprobs.append(parsed)
            usage_add(usage, data.get("usage"))
            calls += 1
        if calls > 1:
            logger.debug("n=%d needed %d calls (the server returned fewer choices than asked)", request.n, calls)
        return ChatResult(texts=texts, finish_reasons=reasons, usage=usage,
                          logprobs=logprobs if request.logprobs else None)

    async def _call(self, client, body: dict):
        """One HTTP call through the SDK: the parsed JSON, or a failed `ChatResult`."""
        import openai

        try:
            # The SDK's documented low-level call: its retries, backoff and timeouts, without the
            # per-request typed-params walk and model parsing (a third of the client's CPU time).
            raw = await client.post("/chat/completions", body=body, cast_to=http_response_class())
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise OracleConfigurationError(self._explain(err)) from None
        except openai.APITimeoutError:
            return ChatResult.failure(f"timeout: no answer within {self.timeout:g} s after {self.max_retries} retries")
        except openai.APIConnectionError as err:
            self._connect_failures = getattr(self, "_connect_failures", 0) + 1
            if self._connect_failures >= max(8, 2 * self.max_concurrency):
                raise OracleConfigurationError(
                    f"{self._connect_failures} requests in a row could not reach {redact_url(self.base_url)} "
                    f"({self._cause(err)}); answers so far are cached, rerun once the server is back") from None
            return ChatResult.failure(
                self._redact(f"connection error after {self.max_retries} retries: {self._cause(err)}"))
        except openai.APIStatusError as err:
            return ChatResult.failure(self._redact(f"HTTP {err.status_code}: {err.message}"))
        except openai.OpenAIError as err:
            return ChatResult.failure(self._redact(f"{type(err).__name__}: {err}"))
        self._connect_failures = 0
        retries = raw.request.headers.get("x-stainless-retry-count", "0")
        if retries != "0":
            logger.debug("request answered after %s retries", retries)
        try:
            data = json.loads(raw.text)
        except ValueError as err:
            return ChatResult.failure(f"malformed response body (not JSON): {err}")
        if not isinstance(data, dict):
            return ChatResult.failure(f"malformed response body: a JSON {type(data).__name__}, not an object")
        return data
