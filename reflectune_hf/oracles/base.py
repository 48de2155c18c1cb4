"""The oracle contract: `ChatRequest` in, `ChatResult` out, one result per request, in order.

An oracle is anything with `complete(requests) -> results`. A failure of one request is a
result with `error` set, never an exception; a configuration error (bad key, unknown model,
unreachable server) raises at once.

Example:
    >>> from reflectune_hf.oracles.base import ChatRequest, ChatResult
    >>> req = ChatRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
    >>> req.key(model="m", base_url="http://127.0.0.1:8000/v1") == req.key(model="m", base_url="http://127.0.0.1:8000/v1")
    True
    >>> ChatResult(texts=["Hello"]).ok
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from ..utils import stable_hash


class OracleConfigurationError(RuntimeError):
    """The oracle cannot work at all: bad API key, unknown model, unreachable server."""


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, independent of any client library.

    Attributes:
        messages: `[{"role": ..., "content": ...}, ...]`.
        temperature, top_p, max_tokens, n, seed: sampling parameters as in the OpenAI API.
        logprobs: ask for token log-probabilities; `top_logprobs` alternatives per token.
    """

    messages: tuple
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: Optional[int] = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self):
        # Frozen and hashable: messages become a tuple of plain dicts' items.
        messages = tuple(
            m if isinstance(m, tuple) else tuple(sorted((str(k), str(v)) for k, v in dict(m).items()))
            for m in self.messages
        )
        object.__setattr__(self, "messages", messages)
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def message_dicts(self) -> list[dict]:
        """The messages as a list of dicts, as chat APIs take them."""
        return [dict(m) for m in self.messages]

    def to_dict(self) -> dict:
        """Canonical dict form (messages as dicts): the basis of cache keys."""
        data = asdict(self)
        data["messages"] = self.message_dicts
        return data

    def key(self, model: str, base_url: Optional[str] = None) -> str:
        """Cache key: hash of the canonical request plus the model and the server it goes to.

        The server is part of the key: the same model name on two servers can be two models.
        """
        return stable_hash({"model": model, "base_url": base_url or "", "request": self.to_dict()}, length=64)


@dataclass
class ChatResult:
    """The answer to one `ChatRequest`.

    Attributes:
        texts: one string per choice (`n` of them) when successful, else `[]`.
        finish_reasons: per choice (`"stop"`, `"length"`, ...).
        usage: token counts (`prompt_tokens`, `completion_tokens`, `total_tokens`).
        logprobs: per choice, a list of `{"token", "logprob", "top_logprobs"}` dicts, or None.
        error: why the request failed, or None.
        cached: True when served from the oracle cache (nothing was sent).
    """

    texts: list = field(default_factory=list)
    finish_reasons: list = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    logprobs: Optional[list] = None
    error: Optional[str] = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The first choice's text ("" when failed)."""
        return self.texts[0] if self.texts else ""

    @classmethod
    def failure(cls, error: str) -> "ChatResult":
        return cls(error=error)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Oracle(Protocol):
    """What the pipeline needs from an LLM: answer requests, same order, same length."""

    def complete(self, requests: list[ChatRequest]) -> list[ChatResult]:  # pragma: no cover - protocol
        ...


def usage_add(total: dict, usage: Optional[dict]) -> dict:
    """Add token counts of `usage` into `total` (in place) and return it."""
    for name, value in (usage or {}).items():
        if isinstance(value, (int, float)):
            total[name] = total.get(name, 0) + value
    return total


def as_requests(items: Any) -> list[ChatRequest]:
    """Accept a single request or a list; check the types early with a clear error."""
    if isinstance(items, ChatRequest):
        return [items]
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, ChatRequest):
            raise TypeError(f"request {i} is a {type(item).__name__}, expected ChatRequest")
    return items
