"""`OpenAIBatchOracle`: the OpenAI Batch API (half price, answers within the completion window).

`complete(requests)` writes the uncached requests as JSONL (`custom_id` = the request's cache
key), uploads it (`purpose="batch"`), creates one batch per part (a part holds at most 50,000
requests and 200 MB, the service's limits), polls with a progress bar until every batch ends,
then downloads the output and error files and maps each line back by `custom_id`. Successes go
to the `OracleCache` (the same keys as `OpenAIOracle`'s, so either path reuses the other's
answers); failed lines become results with `error` set.

Resumable: each batch id is stored with the keys it covers in the cache database the moment the
batch is created. A restarted run (or a run stopped by `max_wait`) finds the batches still in
flight for its requests and collects them instead of submitting again; answers of a batch that
a later run no longer asks for are still cached, never thrown away.

No paid answer is lost nor paid twice, and problems are per-row errors (only authentication
and a missing Batch API raise `OracleConfigurationError`):

- Each good answer is cached the moment its line is read, before the next line.
- A download of an output or error file that fails (5xx after the SDK's retries, a dropped
  connection, a 404) leaves the batch *uncollected*: its unanswered rows get an error, and the
  next `complete` downloads the files again instead of resubmitting.
- An unreadable line (truncated or malformed JSON, no `custom_id`) is an error for its row when
  its `custom_id` can still be read, else for every row of that batch left without an answer.
  The batch is then marked collected: that answer cannot be recovered, so a rerun submits those
  rows again (and only those).
- A batch that ended `failed`, `expired` or `cancelled` gives its answered rows and an error
  (with the service's reasons) for the others, which a rerun submits again.
- A status check that fails is retried at the next poll; rows of a batch never polled
  successfully before `max_wait` say so and are collected, not resubmitted, by the next run.
- A failed upload or batch creation (5xx) is an error for the rows of that part only: nothing
  was submitted for them, and a rerun tries again.

A stored batch whose files can never be downloaded (deleted by hand) keeps its rows failing;
mark it collected with `oracle.cache_store.execute("UPDATE batch_jobs SET done = 1 WHERE
batch_id = ?", (batch_id,))` to have them submitted again.

Tested against a local server implementing the files and batches endpoints (there is no real
Batch service in the test environment); the wire format follows OpenAI's documentation.

Example:
    >>> from reflectune_hf.oracles import ChatRequest, OpenAIBatchOracle
    >>> oracle = OpenAIBatchOracle("gpt-4o-mini", poll_interval=60)  # doctest: +SKIP
    >>> results = oracle.complete([ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=16)])  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace
from typing import ClassVar, Optional

from . import backends
from .base import ChatRequest, ChatResult, OracleConfigurationError, usage_add
from .batch_files import (ENDPOINT, MAX_BYTES_PER_BATCH, MAX_REQUESTS_PER_BATCH,  # noqa: F401 (split_lines: here too)
                          batch_failure_reasons, ensure_batch_tables, read_result_line, split_lines)
from .cache import OracleCache, redact_url
from .http import http_library
from .openai_oracle import OpenAIOracle, parse_choices
from .structured import shape_from_dict

logger = logging.getLogger(__name__)

TERMINAL = ("completed", "failed", "expired", "cancelled", "unknown")  # unknown: the server forgot it
AGAIN = "call complete() again to collect it (it will not be resubmitted)"


class OpenAIBatchOracle(OpenAIOracle):
    """Chat completions through the Batch API, resumable and cached per request.

    Args:
        model, base_url, api_key, timeout, max_retries, cache, progress: as `OpenAIOracle`
            (the cache is required: it also stores the submitted batch ids).
        completion_window: the service's window ("24h").
        poll_interval: seconds between status checks.
        max_wait: stop polling after this many seconds (None: wait until the batches end); rows
            not answered yet come back with an error and the next `complete` collects them.
        max_requests_per_batch, max_bytes_per_batch: split larger submissions.
        backend, structured, vllm_fields, vllm_format: as `OpenAIOracle`; each line's body carries
            the same structured-output fields as the online request (`backend="auto"` means
            `openai` here: the Batch API is OpenAI's wire format, nothing is probed).
    """

    _transient: ClassVar[tuple[str, ...]] = OpenAIOracle._transient + ("poll_interval",)
    _transient_defaults: ClassVar[dict] = {**OpenAIOracle._transient_defaults, "poll_interval": 30.0}

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 completion_window: str = "24h", poll_interval: float = 30.0, max_wait: Optional[float] = None,
                 max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH, max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
                 timeout: float = 120.0, max_retries: int = 6, cache=True, progress: Optional[bool] = None,
                 backend: str = "auto", structured="auto", vllm_fields: str = "auto", vllm_format: str = "regex"):
        if not cache:
            raise ValueError("OpenAIBatchOracle needs the cache: it stores the submitted batch ids to resume")
        super().__init__(model, base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries,
                         cache=cache, progress=progress, backend=backend, structured=structured,
                         vllm_fields=vllm_fields, vllm_format=vllm_format)
        self.completion_window = completion_window
        self.poll_interval = float(poll_interval)
        self.max_wait = max_wait
        self.max_requests_per_batch = int(max_requests_per_batch)
        self.max_bytes_per_batch = int(max_bytes_per_batch)

    fixed_backend = "openai"  # the Batch API's wire format: `backend="auto"` probes nothing

    def __repr__(self) -> str:
        return super().__repr__().replace("OpenAIOracle(", "OpenAIBatchOracle(", 1)

    def _sync_client(self):
        from openai import DefaultHttpxClient, OpenAI

        extra = {"http_client": DefaultHttpxClient(auth=http_library().BasicAuth(*self.auth))} if self.auth else {}
        return OpenAI(api_key=self._key_value(), base_url=self.base_url, timeout=self.timeout,
                      max_retries=self.max_retries, **extra)

    def _config_error(self, err) -> Optional[OracleConfigurationError]:
        """The configuration error an SDK exception means, if it means one."""
        import openai

        if isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return OracleConfigurationError(self._explain(err))
        if isinstance(err, openai.NotFoundError):
            return OracleConfigurationError(f"{self._explain(err)} (does the server implement the Batch API?)")
        if isinstance(err, openai.APIConnectionError):
            return OracleConfigurationError(f"Cannot reach {redact_url(self.base_url)}: {self._cause(err)}")
        return None

    def _api(self, call, *args, **kwargs):
        """One SDK call; authentication, missing endpoints and a dead server raise clearly."""
        import openai

        try:
            return call(*args, **kwargs)
        except openai.OpenAIError as err:
            config = self._config_error(err)
            if config is None:
                raise
            raise config from None

    # -- submission ---------------------------------------------------------------------------
    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        cache = self.cache_store
        ensure_batch_tables(cache)
        model, base_url = self._identity()
        keys = [r.key(model, base_url) for r in requests]
        index = {k: i for i, k in enumerate(keys)}
        results: list[Optional[ChatResult]] = [None] * len(requests)
        reported: set[int] = set()
        problems: dict[str, str] = {}  # batch id or key -> why its rows have no answer this time

        def deliver(key: str, item: Optional[dict], error: Optional[str] = None) -> None:
            i = index.get(key)
            result = ChatResult.failure(error) if error else self._line_result(item, None if i is None else requests[i])
            if i is None:  # an answer a later run no longer asks for: cached all the same
                if result.ok:
                    cache.put(key, result, model=model, base_url=base_url)
            elif results[i] is None or (not results[i].ok and result.ok):
                results[i] = result
                if result.ok:  # final: reported, hence cached, before the next line is read
                    on_result(i, result)
                    reported.add(i)

        client = self._sync_client()
        batch_ids: list[str] = []
        statuses: dict = {}
        try:
            inflight = self._inflight(cache, keys)
            if inflight:
                logger.info("Collecting %d batch(es) submitted earlier instead of resubmitting",
                            len(set(inflight.values())))
            todo = [i for i, k in enumerate(keys) if k not in inflight]
            batch_ids = list(dict.fromkeys(inflight.values())) + self._submit(client, cache, requests, keys, todo,
                                                                              problems)
            statuses = self._poll(client, batch_ids, problems)
            for batch in statuses.values():
                if batch.status in TERMINAL and self._collect(client, batch, deliver, problems):
                    cache.execute("UPDATE batch_jobs SET status = ?, done = 1 WHERE batch_id = ?",
                                  (batch.status, batch.id))
        finally:
            client.close()
        owner = {k: b for b in batch_ids
                 for (k,) in cache.execute("SELECT key FROM batch_requests WHERE batch_id = ?", (b,))}
        for i, key in enumerate(keys):
            if results[i] is None:
                results[i] = ChatResult.failure(self._unanswered(key, owner.get(key), statuses, problems))
            if i not in reported:
                on_result(i, results[i])
        return results

    @staticmethod
    def _unanswered(key: str, batch_id: Optional[str], statuses: dict, problems: dict) -> str:
        """Why the request `key` of batch `batch_id` has no answer after this run."""
        if key in problems:
            return problems[key]
        if batch_id is None:
            return "no batch covers this request: call complete() again"
        if batch_id in problems:
            return problems[batch_id]
        batch = statuses.get(batch_id)
        if batch is None:
            return f"batch {batch_id} could not be checked: {AGAIN}"
        if batch.status not in TERMINAL:
            return f"batch {batch_id} is still {batch.status}: {AGAIN}"
        reasons = batch_failure_reasons(batch)
        return (f"batch {batch_id} ended ({batch.status}{': ' + reasons if reasons else ''}) without an answer "
                "for this request; a rerun submits it again")

    def _inflight(self, cache: OracleCache, keys: list[str]) -> dict[str, str]:
        """`{key: batch_id}` of batches not yet collected that cover some of `keys`."""
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = cache.execute(
                "SELECT r.key, r.batch_id FROM batch_requests r JOIN batch_jobs j ON r.batch_id = j.batch_id "
                f"WHERE j.done = 0 AND j.model = ? AND j.base_url = ? AND r.key IN ({','.join('?' * len(chunk))})",
                [self.model, redact_url(self.base_url), *chunk])
            found.update(dict(rows))
        return found

    def _describe(self, err) -> str:
        """An SDK error in a few words, without the API key."""
        status = getattr(err, "status_code", None)
        return self._redact(f"HTTP {status}: {err.message}" if status else self._cause(err))

    def _submit(self, client, cache: OracleCache, requests, keys, todo: list[int], problems: dict) -> list[str]:
        """Upload and create one batch per part; a part that fails is an error for its rows only."""
        import openai

        lines = [(json.dumps({"custom_id": keys[i], "method": "POST", "url": ENDPOINT,
                              "body": self._body(requests[i], requests[i].n, requests[i].seed)}) + "\n").encode()
                 for i in todo]
        by_line = dict(zip(lines, (keys[i] for i in todo)))
        shaped = [(keys[i], json.dumps(requests[i].answer_format.to_dict())) for i in todo
                  if requests[i].answer_format is not None and self._structured(requests[i])[1]]
        if shaped:
            with cache.transaction() as conn:
                conn.executemany("INSERT OR REPLACE INTO batch_formats (key, answer_format) VALUES (?, ?)", shaped)
        batch_ids = []
        for part in split_lines(lines, self.max_requests_per_batch, self.max_bytes_per_batch):
            try:
                upload = self._api(client.files.create, purpose="batch",
                                   file=("reflectune-batch.jsonl", b"".join(part), "application/jsonl"))
                batch = self._api(client.batches.create, input_file_id=upload.id, endpoint=ENDPOINT,
                                  completion_window=self.completion_window, metadata={"created_by": "reflectune_hf"})
            except openai.APIError as err:  # configuration errors were raised by `_api` already
                why = f"could not submit a batch ({self._describe(err)}); nothing was submitted, a rerun tries again"
                logger.warning("%s (%d requests)", why, len(part))
                problems.update((by_line[line], why) for line in part)
                continue
            with cache.transaction() as conn:  # the batch and its keys, recorded together
                conn.execute("INSERT OR REPLACE INTO batch_jobs (batch_id, model, base_url, input_file_id, status, "
                             "created) VALUES (?,?,?,?,?,?)",
                             (batch.id, self.model, redact_url(self.base_url), upload.id, batch.status, time.time()))
                conn.executemany("INSERT OR IGNORE INTO batch_requests (key, batch_id) VALUES (?, ?)",
                                 [(by_line[line], batch.id) for line in part])
            logger.info("Submitted batch %s with %d requests", batch.id, len(part))
            batch_ids.append(batch.id)
        return batch_ids

    # -- waiting and collecting ---------------------------------------------------------------
    def _poll(self, client, batch_ids: list[str], problems: dict) -> dict:
        from tqdm.auto import tqdm

        deadline = None if self.max_wait is None else time.monotonic() + self.max_wait
        statuses: dict = {}
        show = self.progress if self.progress is not None else True
        bar = tqdm(desc=f"batch {self.model}", unit="req", disable=not show or not batch_ids)
        try:
            while True:
                for batch_id in batch_ids:
                    if batch_id not in statuses or statuses[batch_id].status not in TERMINAL:
                        self._refresh(client, batch_id, statuses, problems)
                counts = [b.request_counts for b in statuses.values() if b.request_counts is not None]
                bar.total = sum(c.total for c in counts) or None
                bar.n = sum(c.completed + c.failed for c in counts)
                bar.set_postfix_str(",".join(sorted({b.status for b in statuses.values()})), refresh=False)
                bar.refresh()
                running = [b for b in batch_ids if b not in statuses or statuses[b].status not in TERMINAL]
                if not running or (deadline is not None and time.monotonic() >= deadline):
                    return statuses
                wait = self.poll_interval if deadline is None else min(self.poll_interval, deadline - time.monotonic())
                time.sleep(max(0.0, wait))
        finally:
            bar.close()

    def _refresh(self, client, batch_id: str, statuses: dict, problems: dict) -> None:
        """Update one batch's status; a network hiccup during a long wait is only a warning."""
        import openai

        try:
            statuses[batch_id] = client.batches.retrieve(batch_id)
            problems.pop(batch_id, None)
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as err:
            logger.warning("Could not poll batch %s (%s); trying again", batch_id, type(err).__name__)
            problems[batch_id] = f"could not check batch {batch_id} ({self._describe(err)}): {AGAIN}"
        except openai.NotFoundError:
            logger.warning("Batch %s is unknown to the server: its requests will be submitted again", batch_id)
            statuses[batch_id] = SimpleNamespace(id=batch_id, status="unknown", request_counts=None, errors=None,
                                                 output_file_id=None, error_file_id=None)
        except openai.OpenAIError as err:
            config = self._config_error(err)
            if config is None:
                raise
            raise config from None

    def _collect(self, client, batch, deliver, problems: dict) -> bool:
        """Map a finished batch's output and error lines back to their requests.

        Returns:
            True when both files were read (the batch may be marked collected), False when a
            download failed: the batch is left for the next run, which downloads it again.
        """
        import openai

        if batch.status != "completed":
            reasons = batch_failure_reasons(batch)
            logger.warning("Batch %s ended with status %s%s", batch.id, batch.status, f": {reasons}" if reasons else "")
        unreadable = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            try:
                text = client.files.content(file_id).text
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise OracleConfigurationError(self._explain(err)) from None
            except openai.APIError as err:
                problems[batch.id] = (f"could not download {file_id} of batch {batch.id} "
                                      f"({self._describe(err)}): {AGAIN}")
                logger.warning("%s", problems[batch.id])
                return False
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                key, item, why = read_result_line(line)
                if why is None:
                    deliver(key, item)
                elif key is not None:
                    deliver(key, None, f"unreadable batch output line {number} of file {file_id} ({why}); "
                                       "a rerun submits this request again")
                else:
                    unreadable.append(f"line {number} of file {file_id}: {why}")
        if unreadable:
            problems[batch.id] = (f"batch {batch.id} had {len(unreadable)} unreadable output line(s) (first: "
                                  f"{unreadable[0]}); the answer to this request was not found, it may be in one of "
                                  "them: a rerun submits it again")
            logger.warning("%s", problems[batch.id])
        return True

    def _decode_line(self, key: Optional[str], request: Optional[ChatRequest], text: str) -> str:
        """A JSON answer of a structured request as its marker text (the shape recorded at
        submission when the request is no longer asked for)."""
        if request is not None:
            return self._decode(request, text)
        rows = list(self.cache_store.execute("SELECT answer_format FROM batch_formats WHERE key = ?", (key,)))
        if not rows:
            return text
        return backends.decode_answer(shape_from_dict(json.loads(rows[0][0])), text)

    def _line_result(self, item: dict, request: Optional[ChatRequest]) -> ChatResult:
        """One output/error line as a result; `request` is None for answers no longer asked for."""
        response = item.get("response") if isinstance(item.get("response"), dict) else {}
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        if item.get("error") or response.get("status_code") != 200:
            error = item.get("error") or body.get("error") or {}
            message = error.get("message") if isinstance(error, dict) else str(error)
            status = response.get("status_code")  # none for requests the service never ran (expired)
            where = f"HTTP {status}" if status else (error.get("code") if isinstance(error, dict) else None)
            return ChatResult.failure(self._redact(f"{where or 'error'}: {message}"))
        try:
            if request is not None:
                with_logprobs, want = request.logprobs, request.n
            else:
                with_logprobs = any((c.get("logprobs") or {}).get("content") is not None for c in body["choices"])
                want = len(body["choices"])
            got = parse_choices(body, want, with_logprobs)
        except (AttributeError, TypeError, KeyError, ValueError) as err:
            return ChatResult.failure(f"malformed batch answer: {err}")
        if len(got) < want:
            return ChatResult.failure(f"the batch answer has {len(got)} choices where n={want} was asked")
        texts, reasons, logprobs = (list(x) for x in zip(*got))
        texts = [self._decode_line(item.get("custom_id"), request, t) for t in texts]
        return ChatResult(texts=texts, finish_reasons=reasons, usage=usage_add({}, body.get("usage")),
                          logprobs=logprobs if with_logprobs else None)
