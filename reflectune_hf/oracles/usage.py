"""Cost before sending: token counts of requests and their price, estimated locally.

Prompt tokens are counted with a local tokenizer (by default the embedded SmolLM2 tokenizer,
no download) plus OpenAI's per-message overhead (3 tokens per message, 3 to prime the reply).
It is an estimate: each provider's tokenizer differs (typically by 10-25% on English text).
Only the text of messages is counted (the text parts of multimodal content, not images).
Output tokens are what the caller expects per choice, by default each request's `max_tokens`
(an upper bound on what is billed) or 512 when unset.

Example:
    >>> from reflectune_hf.oracles import ChatRequest, estimate
    >>> reqs = [ChatRequest([{"role": "user", "content": "Name three colours."}], max_tokens=20)] * 10
    >>> est = estimate(reqs, prices={"input": 0.15, "output": 0.60})
    >>> est.requests, est.output_tokens
    (10, 200)
    >>> round(est.cost, 6) == round((est.prompt_tokens * 0.15 + 200 * 0.60) / 1e6, 6)
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional

from .base import as_requests, content_text

DEFAULT_OUTPUT_TOKENS = 512
TOKENS_PER_MESSAGE = 3
TOKENS_REPLY_PRIMING = 3


@dataclass
class UsageEstimate:
    """What a set of requests would cost, computed before anything is sent.

    Attributes:
        requests: requests that would be sent. prompt_tokens, output_tokens: estimated totals.
        cost: money in the unit of `prices` (None without prices).
        cached_requests, duplicate_requests: requests an oracle would not send (set by
            `oracle.estimate`).
    """

    requests: int
    prompt_tokens: int
    output_tokens: int
    cost: Optional[float] = None
    tokenizer: str = ""
    cached_requests: int = 0
    duplicate_requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}


@lru_cache(maxsize=4)
def _named_tokenizer(name: str):
    from ..models import load_tokenizer

    return load_tokenizer(name)


def _counter(tokenizer) -> tuple[Any, str]:
    if isinstance(tokenizer, str):
        return _named_tokenizer(tokenizer), tokenizer
    if callable(getattr(tokenizer, "encode", None)):
        return tokenizer, getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    raise TypeError("tokenizer must be a model name or an object with .encode(text) (transformers, tiktoken)")


def _encode_len(tokenizer, text: str) -> int:
    try:
        return len(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # tiktoken-style encode(text)
        return len(tokenizer.encode(text))


def estimate(requests, prices: Optional[dict] = None, tokenizer="smollm2-135m-instruct",
             expected_output_tokens: Optional[int] = None) -> UsageEstimate:
    """Estimate prompt tokens, output tokens and money for `requests` before sending them.

    Args:
        requests: `ChatRequest`s.
        prices: `{"input": price per million prompt tokens, "output": per million output
            tokens}`; e.g. halve both for the Batch API. None: no cost.
        tokenizer: a model name for `load_tokenizer` or any object with `.encode(text)`.
        expected_output_tokens: per choice; default each request's `max_tokens`, else 512.

    Returns:
        A `UsageEstimate`.
    """
    requests = as_requests(requests)
    tok, name = _counter(tokenizer)
    prompt_tokens = output_tokens = 0
    for request in requests:
        prompt_tokens += TOKENS_REPLY_PRIMING + sum(
            TOKENS_PER_MESSAGE + _encode_len(tok, content_text(m.get("content"))) for m in request.message_dicts)
        per_choice = expected_output_tokens if expected_output_tokens is not None else (
            request.max_tokens if request.max_tokens is not None else DEFAULT_OUTPUT_TOKENS)
        output_tokens += per_choice * request.n
    cost = None
    if prices is not None:
        unknown = set(prices) - {"input", "output"}
        if unknown:
            raise ValueError(f"prices takes the keys 'input' and 'output' (per million tokens), got {sorted(unknown)}")
        cost = (prompt_tokens * float(prices.get("input", 0.0))
                + output_tokens * float(prices.get("output", 0.0))) / 1e6
    return UsageEstimate(requests=len(requests), prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                         cost=cost, tokenizer=name)
