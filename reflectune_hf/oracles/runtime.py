"""Runtime helpers of `OpenAIOracle`: synchronous entry into its async code, client-side rate
limits, and a value that hides itself from `repr`.

Example:
    >>> from reflectune_hf.oracles.runtime import Secret
    >>> Secret("sk-123")
    Secret('***')
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .base import ChatRequest, content_text


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


async def run_workers(worker, count: int) -> None:
    """Run `count` copies of the coroutine function `worker` and wait for all of them; the first
    exception cancels the others and is raised (nothing is left running)."""
    tasks = [asyncio.ensure_future(worker()) for _ in range(count)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Secret:
    """A value that never shows itself in `repr`/`str` (API keys, URL credentials)."""

    def __init__(self, value):
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


def token_guess(request: ChatRequest, n: int) -> int:
    """A cheap upper-side token count for the TPM limiter (4 characters per token)."""
    prompt = sum(len(content_text(m.get("content"))) for m in request.message_dicts) // 4 + 4 * len(request.messages)
    return prompt + (request.max_tokens or 256) * n
