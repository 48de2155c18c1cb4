"""A student model served by vLLM or llama.cpp: per-token log-probabilities for IFD and SelectIT.

`StudentServer` sends one completions request per scored text (or SelectIT prompt) to an
OpenAI-compatible server and returns log-probabilities aligned with the local tokenisation;
`IFDScorer(base_url=...)` and `SelectITScorer(base_url=...)` compute their scores from them
with the same code as the local engine. Only the tokenizer is loaded locally (no weights).

Backends (`backend`, `"auto"` recognises the server as the oracles do, `oracles.backends`):

- `vllm`: token-id prompts with `prompt_logprobs` (exactly our tokens, nothing re-tokenised);
  SelectIT asks `logprobs=k` with `return_tokens_as_token_ids`.
- `llamacpp` (llama-cpp-python's server; llama.cpp's own `llama-server` echoes no prompt
  log-probabilities, which is reported as an error) and `echo` (any other OpenAI-legacy server):
  text prompts with `echo=True` and `logprobs`, mapped to the local tokens by their character
  offsets (`scoring.served_parse.echo_logprobs`: a span whose scored tokens the server splits
  differently gets the status `misaligned:<loss>`; the context before them may be split
  differently, so the scores can then differ from the local engine's).
  llama-cpp-python (0.3.x) pairs echoed log-probabilities one position off unless the prompt
  starts with the BOS token (abetlen/llama-cpp-python#1983; SmolLM2 and Qwen add none). A
  probe tells, once per client (`echo_shifted`); such a server's answers are read shifted
  (`scoring.served_llamacpp`): each value is the server's probability of the local token after
  the same context as the local engine's, from the echo's top-100 log-probabilities or one
  more request that forces the token; where the server's tokens cannot be matched to ours the
  span is `misaligned:<loss>` (`missing_logprob:<loss>` when the server gives no value).

Requests run concurrently with the oracle layer's HTTP machinery (`oracles.http`): at most
`max_concurrency` on the wire, the openai SDK's retries and backoff (429 with `Retry-After`,
5xx, timeouts, dropped connections: `max_retries`). Each answer is stored in the oracle cache
file (`OracleCache`, table `served_student`) the moment it arrives, keyed on the server URL
(without user or password), the server's model name and the request body (token ids or text):
a killed run resumes where it stopped, a rerun sends nothing. Failures are not cached.

Example:
    >>> from reflectune_hf.scoring.served import StudentServer
    >>> server = StudentServer("http://me:secret@127.0.0.1:8000/v1", server_model="m", backend="vllm")
    >>> server.base_url, "secret" in repr(server)
    ('http://127.0.0.1:8000/v1', False)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, ClassVar, Optional, Sequence

from ..oracles.backends import check_choice, detect_backend
from ..oracles.cache import resolve_cache
from ..oracles.http import check_api_key, http_response_class, in_flight_client, split_userinfo
from ..oracles.runtime import Secret, run_sync, run_workers
from ..sanitize import strip_url_secrets
from ..utils import LazyState, stable_hash
from .served_llamacpp import probe_bodies, probe_is_shifted, shared_texts, shifted_span_logprobs
from .served_parse import (TOKEN_ID_PREFIX, RequestFailed, ServedProblem, StudentServerError, echo_body, echo_logprobs,
                           first_choice, guard, rating_probabilities, top_body, vllm_prompt_body, vllm_prompt_logprobs)

logger = logging.getLogger(__name__)

STUDENT_BACKENDS = ("auto", "vllm", "llamacpp", "echo")
TABLE = "served_student"
_ENDPOINT = "/completions"


def student_backend(value) -> str:
    """`value` as one of `STUDENT_BACKENDS` ("llama.cpp", "llama-cpp" mean `llamacpp`), else a
    ValueError naming them.

    Example:
        >>> from reflectune_hf.scoring.served import student_backend
        >>> student_backend("llama.cpp"), student_backend("VLLM")
        ('llamacpp', 'vllm')
    """
    text = str(value).strip().lower()
    text = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "llama_cpp": "llamacpp"}.get(text, text)
    return check_choice("student_backend", text, STUDENT_BACKENDS)


class StudentServer(LazyState):
    """The client of a served student (see the module docstring).

    Args:
        base_url: the server, e.g. `http://127.0.0.1:8000/v1`; a `user:password@` in it is sent
            as HTTP basic auth and kept out of `base_url`, logs, keys and fingerprints.
        server_model: the model name the server knows (`--served-model-name`).
        backend: `"auto"`, `"vllm"`, `"llamacpp"` or `"echo"` (another OpenAI-legacy server).
        max_concurrency, timeout, max_retries: requests on the wire, seconds per attempt, the
            SDK's retries. They change the speed only: not part of `identity()`.
        cache: True (the oracle cache file), False, a path or an `OracleCache`.
        api_key: default `$OPENAI_API_KEY` (vLLM's `--api-key`); never pickled nor logged.
    """

    # Speed knobs are transient (not in the datasets fingerprint; `num_proc` workers use the defaults).
    _transient: ClassVar[tuple[str, ...]] = ("_cache_obj", "_usage", "_mode", "_shifted", "_shared", "_api_key",
                                             "_connect_failures",
                                             "max_concurrency", "timeout", "max_retries")
    _transient_defaults: ClassVar[dict] = {"max_concurrency": 16, "timeout": 300.0, "max_retries": 6}

    def __init__(self, base_url: str, server_model: str, backend: str = "auto", max_concurrency: int = 16,
                 timeout: float = 300.0, max_retries: int = 6, cache=True, api_key: Optional[str] = None):
        if not base_url or not server_model:
            raise ValueError("a served student needs base_url (e.g. http://127.0.0.1:8000/v1) and server_model")
        if int(max_concurrency) < 1 or float(timeout) <= 0 or int(max_retries) < 0:
            raise ValueError("max_concurrency must be >= 1, timeout > 0 and max_retries >= 0")
        self.base_url, userinfo = split_userinfo(str(base_url).rstrip("/"))
        self._userinfo = Secret(userinfo) if userinfo else None
        self.server_model = str(server_model)
        self.backend = student_backend(backend)
        self.max_concurrency, self.timeout, self.max_retries = int(max_concurrency), float(timeout), int(max_retries)
        self.cache = cache
        self._api_key = Secret(api_key) if api_key else None
        self._cache_obj = self._usage = self._mode = self._shifted = self._shared = None

    def __repr__(self) -> str:
        return f"StudentServer({self.base_url!r}, server_model={self.server_model!r}, backend={self.backend!r})"

    def identity(self) -> dict:
        """What the scores depend on: the server (URL without secrets), its model, the backend."""
        return {"base_url": strip_url_secrets(self.base_url), "server_model": self.server_model,
                "backend": self.backend}

    @property
    def usage(self) -> dict:
        """Requests `sent`, `cached` (served from the cache) and `failed` in this process."""
        if self._usage is None:
            self._usage = {"sent": 0, "cached": 0, "failed": 0}
        return self._usage

    @property
    def auth(self) -> Optional[tuple]:
        return None if self._userinfo is None else self._userinfo.value

    def _key(self) -> str:
        key = self._api_key.value if self._api_key is not None else os.environ.get("OPENAI_API_KEY")
        return check_api_key(key) if key else "not-needed"  # one clear error, the key not shown

    def mode(self) -> str:
        """The backend in use: the setting, or what the server was recognised as (`vllm`,
        `llamacpp`, else `echo`); raises `StudentServerError` when it cannot be reached."""
        if self._mode is None:
            if self.backend != "auto":
                self._mode = self.backend
            else:
                found = detect_backend(self.base_url, self._key(), timeout=min(self.timeout, 10.0), auth=self.auth)
                if found is None:
                    raise StudentServerError(f"Cannot connect to the student server {self.base_url}: is it running "
                                             "and does base_url end in /v1?")
                self._mode = found.backend if found.backend in ("vllm", "llamacpp") else "echo"
                logger.info("Student server %s: %s requests", self.base_url, self._mode)
        return self._mode

    def concurrency(self) -> int:
        """Requests on the wire: `max_concurrency`, at most 2 for llama-cpp-python's server, which
        answers one request at a time (more would only wait there, and time out)."""
        return min(self.max_concurrency, 2) if self.mode() == "llamacpp" else self.max_concurrency

    # -- what the scorers ask ------------------------------------------------------------------
    def span_logprobs(self, tokenizer, spans: Sequence) -> list:
        """For each `engine.Span` (with its `text` for text backends): the
        log-probabilities of its scored tokens `ids[start:]`, or the exception that stands for
        them (`ServedProblem` with a status, `RequestFailed`)."""
        mode = self.mode()
        if mode == "vllm":
            bodies = [vllm_prompt_body(self.server_model, s.ids) for s in spans]
            answers = self.fetch(bodies)
            return [guard(lambda a=a, s=s: vllm_prompt_logprobs(first_choice(a), s.ids, s.start), a)
                    for a, s in zip(answers, spans)]
        plans = _text_plans(tokenizer, spans)
        if mode == "llamacpp" and self.echo_shifted(tokenizer):
            if self._shared is None:
                self._shared = shared_texts(tokenizer)
            return shifted_span_logprobs(self.fetch, self.server_model, spans, plans, self._shared)
        todo = [i for i, p in enumerate(plans) if not isinstance(p, Exception)]
        out = list(plans)
        for i, answer in zip(todo, self.fetch([echo_body(self.server_model, plans[i][0]) for i in todo])):
            text, ends = plans[i]
            out[i] = guard(lambda a=answer, t=text, e=ends, s=spans[i]:
                           echo_logprobs(first_choice(a), e, s.start, len(t)), answer)
        return out

    def echo_shifted(self, tokenizer) -> bool:
        """Whether this llama-cpp-python server pairs echoed log-probabilities one position off
        (`scoring.served_llamacpp`): probed once per client, with two cached requests."""
        if self._shifted is None:
            bodies = probe_bodies(self.server_model, tokenizer)
            self._shifted = probe_is_shifted(bodies, self.fetch(bodies))
            logger.info("Student server %s: echoed log-probabilities are %s", self.base_url,
                        "one position off (read shifted)" if self._shifted else "aligned")
        return self._shifted

    def rating_probabilities(self, tokenizer, prompts: Sequence[Sequence[int]], rating_ids, k: int) -> list:
        """For each prompt (token ids): the probabilities of the ratings (`rating_ids[r]`: the
        ids of rating r) as the next token, or the exception that stands for them."""
        mode = self.mode()
        if mode == "vllm":
            keys = [[f"{TOKEN_ID_PREFIX}{i}" for i in ids] for ids in rating_ids]
            bodies = [top_body(self.server_model, [int(i) for i in p], k, token_ids=True) for p in prompts]
        else:
            decode = (lambda i: tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
            keys = [[decode(i) for i in ids] for ids in rating_ids]
            texts = [tokenizer.decode(p, skip_special_tokens=True, clean_up_tokenization_spaces=False) for p in prompts]
            bodies = [top_body(self.server_model, t, k, token_ids=False) for t in texts]
        answers = self.fetch(bodies)
        return [guard(lambda a=a: rating_probabilities(first_choice(a), keys), a) for a in answers]

    # -- requests, cache, concurrency ----------------------------------------------------------
    @property
    def cache_store(self):
        if self._cache_obj is None and self.cache:
            self._cache_obj = resolve_cache(self.cache)
            self._cache_obj.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, base_url TEXT NOT NULL, "
                                    "model TEXT NOT NULL, answer TEXT NOT NULL, created REAL NOT NULL)")
        return self._cache_obj

    def request_key(self, body: dict) -> str:
        """The cache key of one request: server URL (no secrets), server model, the body."""
        return stable_hash({"base_url": strip_url_secrets(self.base_url), "model": self.server_model, "body": body},
                           length=32)

    def fetch(self, bodies: Sequence[dict], compact=None) -> list:
        """The answers (parsed JSON) to `bodies`, in order: cache first, then one request per
        unique miss, each stored as it arrives (as `compact(answer)` when given: what is stored
        is what is returned); a failed request is a `RequestFailed`."""
        keys = [self.request_key(b) for b in bodies]
        store = self.cache_store
        found: dict[str, Any] = {}
        if store is not None and keys:
            unique = list(dict.fromkeys(keys))
            for lo in range(0, len(unique), 500):
                chunk = unique[lo:lo + 500]
                rows = store.execute(f"SELECT key, answer FROM {TABLE} WHERE key IN ({','.join('?' * len(chunk))})",
                                     chunk)
                found.update((key, json.loads(answer)) for key, answer in rows)
        self.usage["cached"] += sum(k in found for k in keys)
        pending = {k: b for k, b in zip(keys, bodies) if k not in found}
        if pending:
            todo_keys, todo = list(pending), list(pending.values())

            def on_answer(i: int, answer):
                self.usage["sent"] += 1
                if isinstance(answer, Exception):
                    self.usage["failed"] += 1
                    return answer
                if compact is not None:
                    answer = compact(answer)
                if store is not None:
                    store.execute(f"INSERT OR REPLACE INTO {TABLE} (key, base_url, model, answer, created) "
                                  "VALUES (?,?,?,?,?)", (todo_keys[i], strip_url_secrets(self.base_url),
                                                         self.server_model, json.dumps(answer), time.time()))
                return answer

            answers = run_sync(lambda: self._run(todo, on_answer))
            found.update(zip(todo_keys, answers))
            failed = [a for a in answers if isinstance(a, Exception)]
            logger.info("Student server: %d requests, %d from the cache, %d sent, %d failed",
                        len(keys), len(keys) - len(todo), len(todo), len(failed))
            if failed:
                logger.warning("%d student requests failed (not cached: a rerun sends them again). First: %s",
                               len(failed), failed[0])
        return [found[k] for k in keys]

    async def _run(self, bodies: list[dict], on_answer) -> list:
        from openai import AsyncOpenAI

        results: list = [None] * len(bodies)
        order = iter(range(len(bodies)))
        stop = asyncio.Event()
        self._connect_failures = 0
        limit = self.concurrency()
        client = AsyncOpenAI(api_key=self._key(), base_url=self.base_url, timeout=self.timeout,
                             max_retries=self.max_retries, http_client=in_flight_client(limit, stop, auth=self.auth))

        async def worker() -> None:
            try:
                for i in order:  # shared iterator: each worker takes the next body when free
                    results[i] = on_answer(i, await self._post(client, bodies[i]))
            except StudentServerError:
                stop.set()
                raise

        async with client:
            await run_workers(worker, min(2 * limit, len(bodies)))
        return results

    async def _post(self, client, body: dict):
        """One request through the SDK (its retries and backoff): the parsed JSON, or a
        `RequestFailed`; raises `StudentServerError` when nothing can work."""
        import openai

        try:
            raw = await client.post(_ENDPOINT, body=body, cast_to=http_response_class())
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            raise StudentServerError(f"HTTP {err.status_code} from {self.base_url} (model {self.server_model!r}): "
                                     "check the URL (it ends in /v1), the model name and the API key") from None
        except openai.APIConnectionError as err:
            self._connect_failures += 1
            if self._connect_failures >= max(8, 2 * self.max_concurrency):
                raise StudentServerError(f"{self._connect_failures} requests in a row could not reach {self.base_url}; "
                                         "answers so far are cached, rerun once the server is back") from None
            return RequestFailed(f"connection error after {self.max_retries} retries: {type(err).__name__}")
        except openai.APIStatusError as err:
            return RequestFailed(f"HTTP {err.status_code}: {err.message}")
        except openai.OpenAIError as err:
            return RequestFailed(f"{type(err).__name__}: {err}")
        self._connect_failures = 0
        try:
            data = json.loads(raw.text)
            first_choice(data)
        except ValueError as err:
            return RequestFailed(f"malformed response: {err}")
        return data


def _text_plans(tokenizer, spans: Sequence) -> list:
    """For each span: `(text to send, character end of each local token)`, or a
    `ServedProblem` when its tokens are not a prefix of its text's tokenisation."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("text-prompt servers (llama.cpp, OpenAI-legacy) need a fast tokenizer (offset mapping)")
    texts = [s.text for s in spans]
    if any(t is None for t in texts):
        raise ValueError("text-prompt servers need each span's text")
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    plans = []
    for span, text, ids, offsets in zip(spans, texts, encoded["input_ids"], encoded["offset_mapping"]):
        n = len(span.ids)
        if list(ids[:n]) != list(span.ids):
            plans.append(ServedProblem("misaligned", "the span's tokens are not its text's tokens"))
            continue
        ends = [int(e) for _, e in offsets[:n]]
        cut = max(ends) if ends else 0
        plans.append((text[:cut], ends))
    return plans
