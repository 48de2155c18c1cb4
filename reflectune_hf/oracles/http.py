"""The HTTP layer under `OpenAIOracle`: the openai SDK's own HTTP library, whatever its name, and
a transport that bounds the requests actually on the wire.

openai 3.x is built on `httpx2`, openai 1.x and 2.x on `httpx`; the SDK's `_base_client` module
holds the library it uses under that library's name, so it is taken from there (importing
`httpx2`, then `httpx`, by name is only the fallback).

`in_flight_client(limit)` is the SDK's default async HTTP client (its timeouts, connection limits
and redirects) over a transport that lets at most `limit` HTTP exchanges run at once. The oracle
runs more workers than that, so a request waiting out the SDK's retry backoff (a 429's
`Retry-After`, a 5xx) leaves its place on the wire to another one instead of holding it asleep.

The same transport checks each HTTP 200 of `POST .../chat/completions`: a body that is not a chat
completion (truncated or invalid JSON, not an object, no `choices`) is a fault of the exchange, not
an answer, so the SDK receives it as an HTTP 502 marked with the `MALFORMED_HEADER` header and
retries it exactly like a 5xx: the same `max_retries` budget (shared with 429s, 5xx and
timeouts), the same backoff, the same `x-stainless-retry-count`; an error the server sent as an
HTTP 200 (`{"error": {"message": ...}}`) keeps its message. A valid body is parsed once here and
handed over in `response.extensions[PARSED_JSON]`.

Credentials written in a URL (`http://user:key@host/v1`) never go into the SDK: `split_userinfo`
takes them out, and `in_flight_client(..., auth=(user, key))` sends them as HTTP basic auth, which
is what the HTTP library does itself with a URL that carries them (the same `Authorization: Basic`
header on the wire), while every URL the SDK and the HTTP library log or raise stays clean.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
from typing import Any, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

from .base import OracleConfigurationError

MALFORMED_HEADER = "x-reflectune-malformed-body"  # on the 502 that stands for a malformed 200
PARSED_JSON = "reflectune_parsed_json"  # response.extensions key of the parsed body of a valid 200
CHAT_PATH = "/chat/completions"


def split_userinfo(url: str) -> tuple[str, Optional[tuple[str, str]]]:
    """`(url without user:password@, (user, password) or None)`, percent-decoded as HTTP libraries do;
    a `ValueError` naming the host:port (credentials left out) when the port is not a number in range,
    which the socket layer would only report deep inside a request.

    Example:
        >>> from reflectune_hf.oracles.http import split_userinfo
        >>> split_userinfo("http://me:s%40cret@127.0.0.1:8000/v1")
        ('http://127.0.0.1:8000/v1', ('me', 's@cret'))
        >>> split_userinfo("http://127.0.0.1:8000/v1")
        ('http://127.0.0.1:8000/v1', None)
    """
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    try:
        parts.port
    except ValueError as err:
        raise ValueError(f"base_url has a bad port ({hostport}: {err}), e.g. http://127.0.0.1:8000/v1") from None
    if "@" not in parts.netloc:
        return url, None
    user, _, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))
    return clean, (unquote(user), unquote(password))


def check_api_key(key: str) -> str:
    """`key` when an HTTP header can carry it (printable ASCII, no space); else an
    `OracleConfigurationError` that does not show it (the HTTP library's own error quotes the header).

    Example:
        >>> from reflectune_hf.oracles.http import check_api_key
        >>> check_api_key("sk-abc123")
        'sk-abc123'
    """
    if all("!" <= c <= "~" for c in key):
        return key
    raise OracleConfigurationError(
        "The API key (api_key= or $OPENAI_API_KEY) holds a space, a line break or a non-ASCII character, which no "
        "HTTP header can carry: remove it (a key read from a file keeps its trailing newline)")


def chat_body_problem(content: bytes) -> tuple[Any, Optional[str]]:
    """`(parsed JSON, None)` for a usable chat completion body, else `(None, what is wrong)`.

    Example:
        >>> from reflectune_hf.oracles.http import chat_body_problem
        >>> chat_body_problem(b'{"choices": [{"message": {"content": "hi"}}]}')[1] is None
        True
        >>> chat_body_problem(b'{"id": "x"}')[1], chat_body_problem(b'[1]')[1]
        ('a JSON object without choices', 'a JSON list, not an object')
        >>> chat_body_problem(b'{"error": {"message": "context too long"}}')[1]
        'a JSON object without choices (error: context too long)'
    """
    try:
        data = json.loads(content)
    except ValueError as err:
        return None, f"not JSON ({err})"
    if not isinstance(data, dict):
        return None, f"a JSON {type(data).__name__}, not an object"
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        error = data.get("error")  # a server that reports its error with an HTTP 200
        message = error.get("message") if isinstance(error, dict) else error
        return None, "a JSON object without choices" + (f" (error: {message!s:.300})" if message else "")
    if not all(isinstance(c, dict) for c in choices):
        return None, "choices that are not objects"
    return data, None


def http_library():
    """The HTTP library module of the installed openai SDK (`httpx2` or `httpx`).

    Raises:
        ImportError: neither library can be found.
    """
    import openai._base_client as base_client

    for name in ("httpx2", "httpx"):
        module = getattr(base_client, name, None)
        if isinstance(getattr(module, "Response", None), type):
            return module
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("the openai SDK's HTTP library was not found (neither httpx2 nor httpx can be imported)")


@functools.lru_cache(maxsize=None)
def http_response_class() -> type:
    """The HTTP response class of the installed openai SDK (what `cast_to` takes for a raw response)."""
    return http_library().Response


def in_flight_client(limit: int, stop: Optional[asyncio.Event] = None, auth: Optional[tuple[str, str]] = None):
    """The openai SDK's default async HTTP client, with at most `limit` exchanges on the wire.

    Each exchange holds its place until its response body is read; a request between two SDK
    attempts holds none. Once `stop` is set (a configuration error: nothing else will succeed),
    a request that gets a place is cancelled instead of sent. A malformed HTTP 200 of a chat
    completion comes back as a retryable 502 (see the module docstring). `auth`: `(user,
    password)` sent as HTTP basic auth. Build it inside the event loop that uses it.
    """
    from openai import DefaultAsyncHttpxClient
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    library = http_library()

    class InFlightLimit(library.AsyncBaseTransport):
        def __init__(self, inner, limit: int):
            self._inner, self._slots = inner, asyncio.Semaphore(limit)

        async def handle_async_request(self, request):
            async with self._slots:
                if stop is not None and stop.is_set():
                    raise asyncio.CancelledError("the run stopped on a configuration error")
                response = await self._inner.handle_async_request(request)
                try:
                    await response.aread()
                except BaseException:
                    await response.aclose()
                    raise
            if response.status_code == 200 and request.method == "POST" and request.url.path.endswith(CHAT_PATH):
                data, problem = chat_body_problem(response.content)
                if problem is not None:
                    message = f"malformed response body: HTTP 200 with {problem}"
                    return library.Response(502, headers={MALFORMED_HEADER: "1"}, request=request,
                                            json={"error": {"message": message, "type": "malformed_response"}},
                                            extensions={"reason_phrase": b"Malformed 200 body (seen as a 502)"})
                response.extensions[PARSED_JSON] = data
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    inner = library.AsyncHTTPTransport(limits=DEFAULT_CONNECTION_LIMITS)
    extra = {"auth": library.BasicAuth(*auth)} if auth is not None else {}
    return DefaultAsyncHttpxClient(transport=InFlightLimit(inner, limit), **extra)
