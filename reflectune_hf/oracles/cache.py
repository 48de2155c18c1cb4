"""The per-request oracle cache (SQLite, WAL) and the cache-first logic every oracle shares.

One row per request, written the moment that request succeeds: a crash or `kill -9` loses only
the requests in flight, and a rerun sends only what is missing. Several processes (the workers
of `Dataset.map(num_proc=N)`) may read and write the same file at once.

The key is `ChatRequest.key(model, base_url)`: the canonical request (messages, sampling
parameters, `n`, logprobs, seed) plus the model and the server, so the same model name on two
servers never shares answers. Only successes are stored, and never an API key or a header.

Example:
    >>> import tempfile, os
    >>> from reflectune_hf.oracles import ChatRequest, ChatResult, OracleCache
    >>> cache = OracleCache(os.path.join(tempfile.mkdtemp(), "oracle.sqlite"))
    >>> req = ChatRequest(messages=[{"role": "user", "content": "Hi"}])
    >>> key = req.key("my-model", "http://127.0.0.1:8000/v1")
    >>> cache.put(key, ChatResult(texts=["Hello"]), request=req, model="my-model")
    >>> cache.get(key).texts, cache.get(key).cached
    (['Hello'], True)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

from ..sanitize import strip_url_secrets
from ..utils import LazyState, cache_root
from .base import ChatRequest, ChatResult, OracleConfigurationError, as_requests, usage_add

logger = logging.getLogger(__name__)

CACHE_PATH_ENV = "REFLECTUNE_HF_ORACLE_CACHE"
SCHEMA_VERSION = 1
_CHUNK = 500  # keys per SELECT (well under SQLite's variable limit)


def default_cache_path() -> Path:
    """`$REFLECTUNE_HF_ORACLE_CACHE` when set, else `cache_root()/oracle.sqlite`."""
    env = os.environ.get(CACHE_PATH_ENV)
    return Path(env).expanduser() if env else cache_root() / "oracle.sqlite"


def redact_url(url: Optional[str]) -> str:
    """`url` without any `user:password@` part and secret-named query parameters (`?api_key=`):
    what may be logged or stored (`sanitize.strip_url_secrets`)."""
    return strip_url_secrets(url) if url else ""


class OracleCache(LazyState):
    """SQLite store of successful oracle answers, one row per request.

    Args:
        path: the database file; default `$REFLECTUNE_HF_ORACLE_CACHE`, else
            `cache_root()/oracle.sqlite`. Created on first use.

    The connection is opened lazily in each process (pickling keeps the path only), in WAL mode
    with `synchronous=NORMAL`: every `put` is one committed transaction, durable against a
    killed process. Other modules (the Batch oracle) add their own tables with `execute`.
    """

    _transient: ClassVar[tuple[str, ...]] = ("_conn", "_pid", "_lock")

    def __init__(self, path=None):
        self.path = str(Path(path).expanduser() if path is not None else default_cache_path())
        self._conn = self._pid = self._lock = None

    def __repr__(self) -> str:
        return f"OracleCache({self.path!r})"

    # -- connection ---------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        # A connection inherited through fork must not be used (nor closed) by the child.
        self._lock = threading.RLock()
        try:
            if Path(self.path).is_dir():
                raise IsADirectoryError("it is a folder")
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA user_version").fetchone()  # opens the file: a bad path fails here
        except (OSError, sqlite3.Error) as err:
            if type(err) is sqlite3.DatabaseError:  # "file is not a database"
                raise self._damaged(err) from None
            raise OracleConfigurationError(
                f"Cannot open the oracle cache {self.path} ({getattr(err, 'strerror', None) or err}): give a "
                f"database file path you can write (${CACHE_PATH_ENV}, or cache=<path>), or cache=False") from None
        for attempt in range(50):  # switching to WAL needs a moment alone with the file
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                time.sleep(0.05 * (attempt + 1))
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "base_url TEXT NOT NULL, request TEXT, result TEXT NOT NULL, created REAL NOT NULL)"
        )
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._conn, self._pid = conn, os.getpid()
        return conn

    def _damaged(self, err: sqlite3.DatabaseError) -> OracleConfigurationError:
        return OracleConfigurationError(
            f"The oracle cache {self.path} is damaged ({err}): move it away (its answers are asked again), or use "
            f"another file (${CACHE_PATH_ENV}, or cache=<path>), or cache=False")

    @contextlib.contextmanager
    def _intact(self):
        """SQLite's plain `DatabaseError` (a malformed or foreign file) as one clear error; its
        subclasses (a locked or read-only database, a constraint) as they are."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            if type(err) is not sqlite3.DatabaseError:
                raise
            raise self._damaged(err) from None

    def execute(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        """Run one SQL statement on the cache database and return its rows (for extensions)."""
        conn = self._connection()
        with self._lock, self._intact():
            return conn.execute(sql, tuple(params)).fetchall()

    @contextlib.contextmanager
    def transaction(self):
        """`with cache.transaction() as conn:` several statements committed together (or none)."""
        conn = self._connection()
        with self._lock, self._intact():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        """Run one statement for many rows in a single transaction."""
        with self.transaction() as conn:
            conn.executemany(sql, [tuple(r) for r in rows])

    def close(self) -> None:
        """Close this process's connection (it reopens on next use)."""
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = self._pid = None

    # -- responses ----------------------------------------------------------------------------
    def get(self, key: str) -> Optional[ChatResult]:
        """The cached result for `key` (with `cached=True`), or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, ChatResult]:
        """`{key: result}` for the keys present in the cache."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, ChatResult] = {}
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start:start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, text in self.execute(f"SELECT key, result FROM responses WHERE key IN ({marks})", chunk):
                data = json.loads(text)
                found[key] = ChatResult(**{**data, "error": None, "cached": True})
        return found

    def put(self, key: str, result: ChatResult, request: Optional[ChatRequest] = None, model: str = "",
            base_url: Optional[str] = None) -> None:
        """Store a successful result (failures are refused: they must be retried, not replayed).

        Raises:
            OracleConfigurationError: the file cannot be written (read-only, disk full, locked).
        """
        if not result.ok:
            raise ValueError("only successful results are cached")
        data = {"texts": result.texts, "finish_reasons": result.finish_reasons, "usage": result.usage,
                "logprobs": result.logprobs}
        try:
            self.execute(
                "INSERT OR REPLACE INTO responses (key, model, base_url, request, result, created) "
                "VALUES (?,?,?,?,?,?)",
                (key, model, redact_url(base_url), json.dumps(request.to_dict()) if request else None,
                 json.dumps(data), time.time()),
            )
        except sqlite3.OperationalError as err:
            raise OracleConfigurationError(
                f"Cannot write the oracle cache {self.path} ({err}): make it writable, or give another file "
                f"(${CACHE_PATH_ENV}, or cache=<path>), or cache=False") from None

    def delete(self, keys: Iterable[str]) -> None:
        """Forget the given keys (e.g. to force a request to be sent again)."""
        self.executemany("DELETE FROM responses WHERE key = ?", ([k] for k in keys))

    def __contains__(self, key: str) -> bool:
        return bool(self.execute("SELECT 1 FROM responses WHERE key = ?", (key,)))

    def __len__(self) -> int:
        return self.execute("SELECT COUNT(*) FROM responses")[0][0]

    def __bool__(self) -> bool:
        return True  # a cache given as `cache=` is on, empty or not (not `len() > 0`)


def resolve_cache(cache) -> Optional[OracleCache]:
    """`True` -> the default cache, a path -> that file, an `OracleCache` -> itself, falsy -> None."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return OracleCache()
    if isinstance(cache, OracleCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return OracleCache(cache)
    raise TypeError(f"cache must be True, False, a path or an OracleCache, got {type(cache).__name__}")


class CachingOracle(LazyState):
    """Base of the oracles: cache lookup, de-duplication, usage counting, one write per success.

    Subclasses set `self.cache` (the user's setting: True/False/path/OracleCache), implement
    `_identity() -> (model, base_url)` (the cache key's model and server) and
    `_send(requests, on_result)`, which answers unique uncached requests and calls
    `on_result(i, result)` as soon as request `i` is answered.

    `usage` counts what this process really sent: token counts summed over answered requests,
    `requests` (sent), `cached` (served from the cache) and `failed`.
    """

    _transient: ClassVar[tuple[str, ...]] = ("_cache_obj", "_usage")

    def _identity(self) -> tuple[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:  # pragma: no cover
        raise NotImplementedError

    def _prepare(self, request: ChatRequest) -> ChatRequest:
        """Hook: fill oracle defaults into a request before it is keyed (e.g. max_tokens)."""
        return request

    @property
    def cache_store(self) -> Optional[OracleCache]:
        """The `OracleCache` in use in this process, or None when caching is off."""
        if getattr(self, "_cache_obj", None) is None and self.cache:
            self._cache_obj = resolve_cache(self.cache)
        return getattr(self, "_cache_obj", None)

    @property
    def usage(self) -> dict:
        """Token and request counts of this process (not pickled, not fingerprinted)."""
        if getattr(self, "_usage", None) is None:
            self._usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                           "requests": 0, "cached": 0, "failed": 0}
        return self._usage

    def keys(self, requests) -> list[str]:
        """The cache keys of `requests` for this oracle."""
        model, base_url = self._identity()
        return [self._prepare(r).key(model, base_url) for r in as_requests(requests)]

    def cached(self, requests) -> list[bool]:
        """Whether each request would be served from the cache (nothing sent)."""
        keys = self.keys(requests)
        hits = self.cache_store.get_many(keys) if self.cache_store is not None else {}
        return [k in hits for k in keys]

    def estimate(self, requests, prices: Optional[dict] = None, **kwargs):
        """`usage.estimate` over the requests this oracle would really send (cache hits excluded)."""
        from .usage import estimate

        requests = as_requests(requests)
        hits = self.cached(requests)
        todo = list({k: r for k, r, hit in zip(self.keys(requests), requests, hits) if not hit}.values())
        result = estimate(todo, prices=prices, **kwargs)
        result.cached_requests = sum(hits)
        result.duplicate_requests = len(requests) - sum(hits) - len(todo)
        return result

    def complete(self, requests) -> list[ChatResult]:
        """Answer `requests` in order: cache first, then one real request per unique miss.

        Returns one `ChatResult` per request; failures have `error` set. Raises
        `OracleConfigurationError` when the oracle cannot work at all.
        """
        requests = [self._prepare(r) for r in as_requests(requests)]
        if not requests:
            return []
        model, base_url = self._identity()
        keys = [r.key(model, base_url) for r in requests]
        store = self.cache_store
        found = store.get_many(keys) if store is not None else {}
        hits = sum(k in found for k in keys)
        self.usage["cached"] += hits
        pending = {k: r for k, r in zip(keys, requests) if k not in found}
        if pending:
            todo_keys, todo = list(pending), list(pending.values())

            def on_result(i: int, result: ChatResult) -> None:
                usage_add(self.usage, result.usage)
                self.usage["requests"] += 1
                if not result.ok:
                    self.usage["failed"] += 1
                elif store is not None:
                    store.put(todo_keys[i], result, request=todo[i], model=model, base_url=base_url)

            answers = self._send(todo, on_result)
            for key, result in zip(todo_keys, answers):
                found[key] = result
            failed = [r.error for r in answers if not r.ok]
            logger.info("%s: %d requests, %d from the cache, %d sent (duplicates once), %d failed",
                        type(self).__name__, len(requests), hits, len(todo), len(failed))
            if failed:
                logger.warning("%d of %d requests failed (not cached: a rerun retries them). First error: %s",
                               len(failed), len(todo), failed[0])
        seen: set = set()
        out = []
        for key in keys:  # duplicates get their own copy, so callers may mutate results freely
            out.append(copy.deepcopy(found[key]) if key in seen else found[key])
            seen.add(key)
        return out
