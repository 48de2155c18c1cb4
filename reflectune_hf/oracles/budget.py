"""The completion budget of a request under a known context window, as the method's reference
computes it: `min(max_tokens, context_window - prompt_tokens)`, so a long prompt gets a smaller
budget instead of an HTTP 400 from the server; a prompt that leaves no room is not sent.

The prompt is counted exactly with a tokenizer (its chat template applied, with the generation
prompt), or, without one, estimated by `estimate_prompt_tokens`: half the UTF-8 bytes of the
message texts, plus 8 tokens per message and 8 for the reply. Common tokenizers average about 4
bytes per token on English prose and 2-3 on code, so the estimate stays above the real count
(over the 6,222 reflection prompts of the 3,111 Alpaca rows in `../shared/data`, SmolLM2's exact
count was at most 79% of it); it is not a bound for text made mostly of digits or of scripts a
tokenizer splits into single bytes: give a tokenizer for an exact count.

Example:
    >>> from reflectune_hf.oracles import ChatRequest
    >>> from reflectune_hf.oracles.budget import PromptCounter, completion_budget
    >>> request = ChatRequest([{"role": "user", "content": "x" * 1000}], max_tokens=512)
    >>> PromptCounter().count(request)  # 1000 bytes / 2 + 8 + 8
    516
    >>> completion_budget(request.max_tokens, 516, context_window=4096), completion_budget(512, 516, 800)
    (512, 284)
    >>> completion_budget(512, 516, 500)
    Traceback (most recent call last):
    ...
    ValueError: prompt of 516 tokens (estimated) does not fit the context window of 500
"""

from __future__ import annotations

import math
from typing import ClassVar, Optional

from ..utils import LazyState
from .base import ChatRequest, OracleConfigurationError, content_text

TOKENS_PER_MESSAGE = 8
TOKENS_REPLY = 8


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """An over-estimate of a chat prompt's tokens without a tokenizer (see the module docstring)."""
    size = sum(len(content_text(m.get("content")).encode("utf-8", "surrogatepass")) for m in messages)
    return math.ceil(size / 2) + TOKENS_PER_MESSAGE * len(messages) + TOKENS_REPLY


def completion_budget(max_tokens: Optional[int], prompt_tokens: int, context_window: int,
                      exact: bool = False) -> Optional[int]:
    """`min(max_tokens, context_window - prompt_tokens)` (`max_tokens` None: unchanged, None).

    Raises:
        ValueError: the prompt leaves no room for a single token ("prompt of N tokens does not
            fit the context window of M").
    """
    room = context_window - prompt_tokens
    if room <= 0:
        how = "" if exact else " (estimated)"
        raise ValueError(f"prompt of {prompt_tokens} tokens{how} does not fit the context window of {context_window}")
    return None if max_tokens is None else min(max_tokens, room)


class PromptCounter(LazyState):
    """Counts a request's prompt tokens: exactly with `tokenizer` (a Hub id, a local path or an
    embedded alias, loaded once per process with `models.load_tokenizer`, nothing downloaded
    when offline), else with `estimate_prompt_tokens`. Pickles to the tokenizer name only.
    """

    _transient: ClassVar[tuple[str, ...]] = ("_tokenizer", "_memo")
    _MEMO_SIZE: ClassVar[int] = 65536

    def __init__(self, tokenizer: Optional[str] = None):
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise TypeError(f"tokenizer must be a model name or path (str), got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer or None

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def _count(self, request: ChatRequest) -> int:
        if self.tokenizer is None:
            return estimate_prompt_tokens(request.message_dicts)
        if getattr(self, "_tokenizer", None) is None:
            from ..models import load_tokenizer

            # A configuration error, raised at once (not one failed row each: every row would fail).
            try:
                tokenizer = load_tokenizer(self.tokenizer)
            except Exception as err:  # noqa: BLE001 - OSError offline, ValueError for an unknown kind...
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise OracleConfigurationError(f"cannot load the tokenizer {self.tokenizer!r} that counts prompt "
                                               f"tokens for context_window: {first}") from None
            if not getattr(tokenizer, "chat_template", None):
                raise OracleConfigurationError(
                    f"tokenizer {self.tokenizer!r} has no chat template, so it cannot count a chat prompt: give the "
                    "served model's tokenizer, or none for the estimate")
            self._tokenizer = tokenizer
        ids = self._tokenizer.apply_chat_template(request.message_dicts, tokenize=True, add_generation_prompt=True)
        if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    def count(self, request: ChatRequest) -> int:
        """The prompt tokens of `request` (remembered per message list)."""
        memo = getattr(self, "_memo", None)
        if memo is None or len(memo) >= self._MEMO_SIZE:
            memo = self._memo = {}
        if request.messages not in memo:
            memo[request.messages] = self._count(request)
        return memo[request.messages]
