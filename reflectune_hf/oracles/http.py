"""The HTTP layer under `OpenAIOracle`: the openai SDK's own HTTP library, whatever its name, and
a transport that bounds the requests actually on the wire.

openai 3.x is built on `httpx2`, openai 1.x and 2.x on `httpx`; the SDK's `_base_client` module
holds the library it uses under that library's name, so it is taken from there (importing
`httpx2`, then `httpx`, by name is only the fallback).

`in_flight_client(limit)` is the SDK's default async HTTP client (its timeouts, connection limits
and redirects) over a transport that lets at most `limit` HTTP exchanges run at once. The oracle
runs more workers than that, so a request waiting out the SDK's retry backoff (a 429's
`Retry-After`, a 5xx) leaves its place on the wire to another one instead of holding it asleep.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from typing import Optional


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


def in_flight_client(limit: int, stop: Optional[asyncio.Event] = None):
    """The openai SDK's default async HTTP client, with at most `limit` exchanges on the wire.

    Each exchange holds its place until its response body is read; a request between two SDK
    attempts holds none. Once `stop` is set (a configuration error: nothing else will succeed),
    a request that gets a place is cancelled instead of sent. Build it inside the event loop
    that uses it.
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
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

    inner = library.AsyncHTTPTransport(limits=DEFAULT_CONNECTION_LIMITS)
    return DefaultAsyncHttpxClient(transport=InFlightLimit(inner, limit))
