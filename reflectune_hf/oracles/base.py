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

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

from ..utils import stable_hash
from .structured import AnswerFormat, shape_from_dict


class OracleConfigurationError(RuntimeError):
    """The oracle cannot work at all: bad API key, unknown model, unreachable server."""


class _FrozenDict(tuple):
    """A JSON object inside a frozen message: its `(key, value)` items, sorted by key."""

    __slots__ = ()


def _freeze(value: Any, where: str) -> Any:
    """A hashable copy of a JSON-able value (dicts -> `_FrozenDict`, lists -> tuples)."""
    if isinstance(value, _FrozenDict):
        return value
    if isinstance(value, Mapping):
        for name in value:
            if not isinstance(name, str):
                raise TypeError(f"{where}: keys must be strings, got {type(name).__name__} {name!r}")
        return _FrozenDict((k, _freeze(v, f"{where}.{k}")) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"{where}: a {type(value).__name__} is not JSON-able (use str, numbers, lists and dicts)")


def _thaw(value: Any) -> Any:
    """The JSON form of a `_freeze`d value (`_FrozenDict` -> dict, tuple -> list)."""
    if isinstance(value, _FrozenDict):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze_message(message: Any, i: int) -> tuple:
    """Check one chat message and return it as sorted `(key, value)` pairs, values kept as given."""
    if isinstance(message, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in message):
        message = {k: _thaw(v) for k, v in message}  # already frozen (`dataclasses.replace` of a request)
    if not isinstance(message, Mapping):
        raise TypeError(f"messages[{i}] is a {type(message).__name__}, expected a dict with 'role' and 'content'")
    missing = [name for name in ("role", "content") if name not in message]
    if missing:
        raise ValueError(f"messages[{i}] has no {' or '.join(repr(m) for m in missing)} "
                         f"(got keys {sorted(map(str, message))})")
    role, content = message["role"], message["content"]
    if not isinstance(role, str) or not role:
        raise ValueError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
    if content is None:
        if role != "assistant":  # the API allows null content on assistant (tool call) turns only
            raise ValueError(f"messages[{i}] ({role}) has content None: pass a string or a list of content parts")
    elif not isinstance(content, (str, list, tuple)):
        raise TypeError(f"messages[{i}]['content'] must be a string or a list of content parts, "
                        f"got {type(content).__name__}")
    elif not isinstance(content, str):
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise TypeError(f"messages[{i}]['content'][{j}] must be a content part dict with a 'type' "
                                f"(e.g. {{'type': 'text', 'text': ...}}), got {part!r:.80}")
    frozen = _freeze(dict(message), f"messages[{i}]")
    return tuple(frozen)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer{' or None' if optional else ''}, got {type(value).__name__} "
                        f"{value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def content_text(content: Any) -> str:
    """The text of a message's content: the string itself, or the text parts of a part list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(str(dict(p).get("text", "")) for p in content if dict(p).get("type") == "text")


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, independent of any client library.

    Attributes:
        messages: a list of `{"role": ..., "content": ...}` dicts (more keys, e.g. `name`, are
            kept). `content` is a string or a list of content parts (`[{"type": "text",
            "text": ...}, {"type": "image_url", ...}]`); `None` only on assistant turns. Kept as
            given (stored frozen, hashable; `message_dicts` gives them back as JSON).
        temperature, top_p, max_tokens, n, seed: sampling parameters as in the OpenAI API.
        logprobs: ask for token log-probabilities; `top_logprobs` alternatives per token.
        answer_format: the answer shape the stage needs (`reflectune_hf.oracles.structured`:
            `MarkedFields`, `ScoreLine`, `RankingAnswer`, or its `to_dict()`), enforced by
            backends that can (grammar, regex, JSON schema) and ignored by the others; None (the
            default) leaves `to_dict()` and the cache key exactly as without the field.

    Raises:
        TypeError: `messages` is not a list of dicts (e.g. a bare string or a single dict), or a
            parameter has the wrong type.
        ValueError: a message lacks `role` or `content`, or a parameter is out of range
            (`max_tokens` < 1, `n` < 1, `temperature` < 0, `top_p` outside (0, 1]).
    """

    messages: tuple
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: Optional[int] = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    seed: Optional[int] = None
    answer_format: Optional[AnswerFormat] = None

    def __post_init__(self):
        messages = self.messages
        if isinstance(messages, (str, bytes)):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, got a string: "
                            "wrap it as [{'role': 'user', 'content': text}]")
        if isinstance(messages, Mapping):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts, got a single dict: "
                            "wrap it in a list")
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                            f"got {type(messages).__name__}")
        if not messages:
            raise ValueError("messages is empty: a chat request needs at least one message")
        # Frozen and hashable: each message becomes a tuple of its sorted (key, value) items.
        object.__setattr__(self, "messages", tuple(_freeze_message(m, i) for i, m in enumerate(messages)))
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not _is_number(value) or math.isnan(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        for name in ("temperature", "top_p"):  # `temperature=0` is 0.0: one cache key for one request
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("n", self.n, 1, optional=False)
        _check_int("top_logprobs", self.top_logprobs, 0)
        _check_int("seed", self.seed, -(2 ** 63))
        if self.answer_format is not None:
            object.__setattr__(self, "answer_format", shape_from_dict(self.answer_format))

    @property
    def message_dicts(self) -> list[dict]:
        """The messages as a list of dicts, as chat APIs take them."""
        return [{k: _thaw(v) for k, v in m} for m in self.messages]

    def to_dict(self) -> dict:
        """Canonical dict form (messages as dicts): the basis of cache keys."""
        data = asdict(self)
        data["messages"] = self.message_dicts
        if self.answer_format is None:
            del data["answer_format"]  # cache keys of plain requests stay as they were
        else:
            data["answer_format"] = self.answer_format.to_dict()
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
    """Add token counts of `usage` into `total` (in place) and return it; a `usage` that is not a
    mapping (a server's `null`, a number, a list) counts nothing."""
    for name, value in (usage.items() if isinstance(usage, Mapping) else ()):
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
