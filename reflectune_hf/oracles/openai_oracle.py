"""`OpenAIOracle`: any OpenAI-compatible chat server (OpenAI, vLLM, TGI, Ollama, llama.cpp).

Requests run with continuous concurrency: `max_concurrency` requests are always in flight (a
pool of workers, not fixed batches that wait for their slowest member). Retries,
backoff, `Retry-After` and timeouts are the openai SDK's own (`max_retries`, `timeout`); an
HTTP 200 whose body is not a chat completion (truncated JSON, no `choices`, not an object) is
retried like a 5xx within the same `max_retries` (`oracles.http`). An optional limiter spaces
requests under a requests-per-minute and tokens-per-minute budget. Every success is written to
the `OracleCache` at once, so an interrupted run resumes where it stopped and a rerun sends
nothing.

With `context_window` set, each request's completion budget is `min(max_tokens, context_window
- prompt_tokens)` (`oracles.budget`; prompt tokens counted exactly with `tokenizer`, else
over-estimated), and a prompt that does not fit is not sent: its row fails with "prompt of N
tokens does not fit the context window of M". The cache key is that of the request as sent
(the reduced `max_tokens`): a rerun computes the same budget, hence the same key, and a row whose
budget is not reduced keeps the key it has without `context_window`.

Credentials in `base_url` (`http://user:key@host/v1`) are taken out of the URL at once and sent
as HTTP basic auth, as the HTTP library itself would send them: `base_url`, `repr`, logs, errors,
cache keys and the cache hold the URL without them.

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
import dataclasses
import json
import logging
import os
from typing import Any, ClassVar, Optional
from urllib.parse import urlsplit

from . import backends
from .base import ChatRequest, ChatResult, OracleConfigurationError, usage_add
from .budget import PromptCounter, completion_budget
from .cache import CachingOracle, redact_url
from .http import (MALFORMED_HEADER, PARSED_JSON, check_api_key, http_response_class, in_flight_client,
                   split_userinfo)
from .runtime import RateLimiter, Secret, run_sync, run_workers, token_guess

logger = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
FAILED_FINISH_REASONS = ("error", "abort")  # OpenRouter's failed generation, vLLM's aborted one (a partial text)


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


def parse_choices(data: dict, want: int, with_logprobs: bool) -> list[tuple]:
    """`(text, finish_reason, logprobs)` of up to `want` choices; ValueError when unusable (a choice the
    server ended on an error, `FAILED_FINISH_REASONS` or an `error` object, is: its text is partial)."""
    choices = data.get("choices")
    if not choices:
        raise ValueError("no choices")
    got = []
    for choice in choices[:want]:
        reason, error = choice.get("finish_reason"), choice.get("error")
        if reason in FAILED_FINISH_REASONS or error:
            detail = (error.get("message") if isinstance(error, dict) else error) or "no message"
            raise ValueError(f"the server ended the answer with finish_reason {reason!r} ({detail!s:.200})")
        parsed = parse_logprobs(choice) if with_logprobs else None
        if with_logprobs and parsed is None:
            raise ValueError("the server returned no logprobs although logprobs=True was asked")
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        if not isinstance(message.get("content"), str):  # a refusal, a tool call, a reasoning-only turn
            refusal = f"; refusal: {message['refusal']!r:.200}" if message.get("refusal") else ""
            raise ValueError(f"a choice without text content (content {message.get('content')!r:.40}, finish_reason "
                             f"{choice.get('finish_reason')!r}{refusal})")
        got.append((message["content"], choice.get("finish_reason"), parsed))
    return got


class OpenAIOracle(backends.StructuredOutput, CachingOracle):
    """Chat completions from any OpenAI-compatible server, cached per request.

    Args:
        model: the model name the server knows.
        base_url: the server, e.g. `http://127.0.0.1:8000/v1` (vLLM, TGI, Ollama, llama.cpp);
            default `$OPENAI_BASE_URL`, else OpenAI. Part of every cache key. A `user:password@`
            in it is sent as HTTP basic auth and kept out of `base_url`, logs and the cache.
        api_key: default `$OPENAI_API_KEY`, read in each process and never pickled. A key passed
            here travels to `num_proc` workers inside the pickled oracle (so it enters the
            `datasets` fingerprint hash) but never appears in `repr`, logs, the cache or results.
            Local servers need none.
        max_concurrency: requests in flight at once (per process: `num_proc=N` multiplies it).
        timeout: seconds per HTTP attempt. max_retries: the SDK's retries (429, 408, 409, 5xx,
            timeouts, dropped connections, and here a malformed HTTP 200; honours `Retry-After`;
            one budget for all of them). Logged at debug level.
        requests_per_minute, tokens_per_minute: optional client-side budget (per process).
        cache: True (default cache file), False, a path or an `OracleCache`.
        progress: show a tqdm bar; None shows it for runs of more than 64 requests.
        context_window: the server model's context length in tokens; when set, each request's
            completion budget is `min(max_tokens, context_window - prompt_tokens)` and a prompt
            that does not fit fails its row without being sent (see the module docstring).
        tokenizer: counts prompt tokens exactly for `context_window` (a Hub id, a local path or
            an embedded alias such as "smollm2-135m-instruct", loaded here, chat template
            applied); default: `budget.estimate_prompt_tokens`, an over-estimate.
        backend: `"auto"` (recognise the server once per process: `oracles.backends`),
            `"llamacpp"`, `"vllm"`, `"openai"` or `"plain"`. structured: `"auto"` (enforce a
            request's `answer_format` where the backend can, free text with one logged note where
            it cannot), `"on"` (raise `OracleConfigurationError` where it cannot) or `"off"`.
            vllm_fields: `"auto"` (from vLLM's `/version`), `"structured_outputs"` (vLLM >=
            0.10.2) or `"guided"` (`guided_regex`, vLLM < 0.12); vllm_format: `"regex"` or `"json"`.

    The pickled state (hence the `datasets` fingerprint) is this configuration only: clients,
    event loops, connections and usage counters are rebuilt lazily in each process, and the
    speed knobs (`max_concurrency`, `timeout`, `max_retries`, `progress`) are left out, so a
    rerun with other values is served from the datasets cache (`num_proc` workers use their
    defaults; `requests_per_minute` and `tokens_per_minute` do travel to them).

    Example:
        >>> from reflectune_hf.oracles import OpenAIOracle
        >>> oracle = OpenAIOracle("gpt-4o-mini", base_url="http://127.0.0.1:8000/v1", api_key="sk-x")
        >>> "sk-x" in repr(oracle)
        False
    """

    # Speed knobs are not in the datasets fingerprint (a rerun with another concurrency is served
    # from the cache); `num_proc` workers use their defaults. The token budgets stay: workers honour them.
    _transient: ClassVar[tuple[str, ...]] = CachingOracle._transient + (
        "_reached_pid", "_connect_failures", "max_concurrency", "timeout", "max_retries", "progress")
    _transient_defaults: ClassVar[dict] = {"max_concurrency": 32, "timeout": 120.0, "max_retries": 6}

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 max_concurrency: int = 32, timeout: float = 120.0, max_retries: int = 6,
                 requests_per_minute: Optional[float] = None, tokens_per_minute: Optional[float] = None,
                 cache=True, progress: Optional[bool] = None, context_window: Optional[int] = None,
                 tokenizer: Optional[str] = None, backend: str = "auto", structured="auto",
                 vllm_fields: str = "auto", vllm_format: str = "regex"):
        if not model:
            raise ValueError("model is required (the name the server knows the model by)")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if context_window is not None and (isinstance(context_window, bool) or not isinstance(context_window, int)
                                           or context_window < 1):
            raise ValueError(f"context_window must be an integer >= 1 or None, got {context_window!r}")
        self.model = str(model)
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        self.base_url, userinfo = split_userinfo(url)
        self._userinfo = Secret(userinfo) if userinfo else None
        self._api_key = Secret(api_key) if api_key else None
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.context_window = context_window
        self.prompt_counter = PromptCounter(tokenizer)
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
        key = self._api_key.value if self._api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key and self._is_openai:
            raise OracleConfigurationError("No API key for OpenAI: set OPENAI_API_KEY or pass api_key=...")
        return check_api_key(key) if key else "not-needed"  # local servers accept any key

    def _redact(self, text: str) -> str:
        key = self._api_key.value if self._api_key is not None else os.environ.get("OPENAI_API_KEY")
        secrets = [key] if key else []
        if getattr(self, "_userinfo", None) is not None:
            user, password = self._userinfo.value
            secrets += [f"{user}:{password}@", password] if password else [f"{user}@"]
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    @property
    def auth(self) -> Optional[tuple[str, str]]:
        """`(user, password)` taken from `base_url`, sent as HTTP basic auth; None without them."""
        userinfo = getattr(self, "_userinfo", None)
        return None if userinfo is None else userinfo.value

    def _client(self, stop: Optional[asyncio.Event] = None):
        from openai import AsyncOpenAI

        return AsyncOpenAI(api_key=self._key_value(), base_url=self.base_url, timeout=self.timeout,
                           max_retries=self.max_retries,
                           http_client=in_flight_client(self.max_concurrency, stop, auth=self.auth))

    # -- the context window -------------------------------------------------------------------
    def _prepare(self, request: ChatRequest) -> ChatRequest:
        """The request as sent: its `max_tokens` cut to the room the context window leaves."""
        request = super()._prepare(request)
        if getattr(self, "context_window", None) is None or request.max_tokens is None:
            return request
        try:
            budget = completion_budget(request.max_tokens, self.prompt_counter.count(request), self.context_window)
        except ValueError:
            return request  # does not fit: `_one` fails it without sending it
        return request if budget == request.max_tokens else dataclasses.replace(request, max_tokens=budget)

    def _context_problem(self, request: ChatRequest) -> Optional[str]:
        """Why `request` cannot be sent under `context_window`, or None."""
        if getattr(self, "context_window", None) is None:
            return None
        counter = self.prompt_counter
        try:
            completion_budget(request.max_tokens, counter.count(request), self.context_window, exact=counter.exact)
        except ValueError as err:
            hint = "" if counter.exact else "; tokenizer= (--context_tokenizer) counts it exactly"
            return f"{err}: not sent (shorten the row or raise context_window{hint})"
        return None

    # -- sending ------------------------------------------------------------------------------
    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        self._key_value()  # a key no HTTP header can carry fails here, before the server is probed
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
                await run_workers(lambda: worker(client), workers)
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
        problem = self._context_problem(request)
        if problem is not None:
            return ChatResult.failure(problem)
        texts, reasons, logprobs, usage = [], [], [], {}
        calls = 0
        while len(texts) < request.n:
            want = request.n - len(texts)
            seed = None if request.seed is None else request.seed + calls
            if limiter is not None:
                await limiter.acquire(token_guess(request, want))
            data = await self._call(client, self._body(request, want, seed))
            if isinstance(data, ChatResult):
                return data
            try:
                got = parse_choices(data, want, request.logprobs)
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
            if err.response.headers.get(MALFORMED_HEADER):  # a 200 that was no completion, every time
                body = err.body if isinstance(err.body, dict) else {}
                detail = str(body.get("message") or (body.get("error") or {}).get("message") or "")
                return ChatResult.failure(self._redact(f"{detail or 'malformed response body'} "
                                                       f"(after {self.max_retries} retries)"))
            return ChatResult.failure(self._redact(f"HTTP {err.status_code}: {err.message}"))
        except openai.OpenAIError as err:
            return ChatResult.failure(self._redact(f"{type(err).__name__}: {err}"))
        self._connect_failures = 0
        retries = raw.request.headers.get("x-stainless-retry-count", "0")
        if retries != "0":
            logger.debug("request answered after %s retries", retries)
        data = raw.extensions.get(PARSED_JSON)  # parsed and checked by the transport
        if data is not None:
            return data
        try:
            data = json.loads(raw.text)
        except ValueError as err:
            return ChatResult.failure(f"malformed response body (not JSON): {err}")
        if not isinstance(data, dict):
            return ChatResult.failure(f"malformed response body: a JSON {type(data).__name__}, not an object")
        return data
