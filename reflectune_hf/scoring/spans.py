"""Which tokens of `prompt + response` are the response: the method's one rule (REFERENCE.md §6).

Every loss over a response uses it: IFD's conditional losses (`scoring.ifd`), the quality
report's response perplexity (`evaluation.quality`) and Tuna's labels (`tuna.trainer`). The text
`prompt + response` is tokenised ONCE, with the tokenizer's own special tokens, and cut on the
right at `max_length` as the tokenizer truncates; the scored tokens start at `len(tok(prompt))`,
the reference script's `len(tok(text[:text.rfind(target)]))` (the text before the response is
the prompt). So the response is read in the tokens the model sees in training and generation:
where a tokenizer merges across the boundary (SmolLM2's byte-level BPE spells "ASSISTANT:" +
"-) ok" as "ASSISTANT", ":-", ")", " ok"), the first scored token is the one at the prompt's
token count (")"), whatever the merge did to the tokens before it.

A `Span` (`scoring.engine`) carries the tokens and that start; `mean_token_losses` turns spans
into mean losses. `n_scored < 1` means nothing is left to score (an empty response, or one the
truncation cut away).

Example:
    >>> from reflectune_hf.models import load_tokenizer
    >>> from reflectune_hf.scoring.spans import response_span
    >>> tok = load_tokenizer("smollm2-135m-instruct")
    >>> span = response_span(tok, "USER: Smile. ASSISTANT:", "-) ok")
    >>> tok.convert_ids_to_tokens(span.ids[span.start - 1:])  # the merged token is context
    [':-', ')', 'Ġok']
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence

from .engine import Span


def truncate_ids(tokenizer, text: str, ids: list, max_length: Optional[int]) -> list:
    """`ids`, the tokens of `text` (special tokens included), cut on the right to `max_length` as
    the tokenizer's own truncation cuts them (its special tokens kept); `None` keeps them all.

    Example:
        >>> from reflectune_hf.models import load_tokenizer
        >>> from reflectune_hf.scoring.spans import truncate_ids
        >>> tok = load_tokenizer("smollm2-135m-instruct")
        >>> ids = tok("one two three")["input_ids"]
        >>> truncate_ids(tok, "one two three", ids, 2) == ids[:2], truncate_ids(tok, "x", [1], 0)
        (True, [])
    """
    if max_length is None or len(ids) <= max_length:
        return list(ids)
    if max_length <= 0:
        return []
    return tokenizer.encode(text, truncation=True, max_length=max_length)


def response_span(tokenizer, prompt: str, response: str, max_length: Optional[int] = None,
                  group: Hashable = None, eos: bool = False, encoded: Optional[dict] = None) -> Span:
    """The tokens of `prompt + response` (right-truncated at `max_length`) and the first scored
    one, `max(len(tok(prompt)), 1)`: the method's rule (module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (its special tokens are added, as the reference does).
        prompt, response: the two texts; the tokenizer reads their concatenation.
        max_length: right truncation of the joint text (None: none).
        group: the span's `group` for `mean_token_losses` (spans of one group share a prefix pass).
        eos: append the tokenizer's EOS after the response (scored too), as Tuna trains; it is
            dropped when the text already fills `max_length`.
        encoded: optional dict `text -> tokenizer(text)["input_ids"]` read and filled, for callers
            that tokenise the same texts in one batch (`response_spans`, `IFDScorer`).

    Returns:
        A `Span` with `text = prompt + response`; `n_scored < 1` when no response token is left.
    """
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise TypeError(f"response_span: prompt and response must be strings, got {type(prompt).__name__} "
                        f"and {type(response).__name__}")
    cache = {} if encoded is None else encoded
    text = prompt + response
    missing = [t for t in dict.fromkeys((prompt, text)) if t not in cache]
    if missing:
        cache.update(zip(missing, tokenizer(missing, add_special_tokens=True)["input_ids"]))
    ids = truncate_ids(tokenizer, text, cache[text], max_length)
    if eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("response_span(eos=True): the tokenizer has no EOS token; set tokenizer.eos_token")
        if max_length is None or len(cache[text]) < max_length:
            ids.append(tokenizer.eos_token_id)
    return Span(ids, max(len(cache[prompt]), 1), group=group, text=text)


def response_spans(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: Optional[int] = None,
                   group: Hashable = None, eos: bool = False) -> list:
    """`response_span` of each `(prompt, response)` pair, every distinct text tokenised in one
    batched call.

    Example:
        >>> from reflectune_hf.models import load_tokenizer
        >>> from reflectune_hf.scoring.spans import response_spans
        >>> tok = load_tokenizer("smollm2-135m-instruct")
        >>> spans = response_spans(tok, ["Q: hi\\nA:", "Q: hi\\nA:"], [" Hello.", ""], max_length=64)
        >>> [s.n_scored for s in spans]
        [2, 0]
    """
    if len(prompts) != len(responses):
        raise ValueError(f"response_spans: {len(prompts)} prompts but {len(responses)} responses")
    for k, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(f"response_spans: pair {k} is not two strings ({type(prompt).__name__}, "
                            f"{type(response).__name__})")
    texts = list(dict.fromkeys([*prompts, *(p + r for p, r in zip(prompts, responses))]))
    encoded = dict(zip(texts, tokenizer(texts, add_special_tokens=True)["input_ids"])) if texts else {}
    return [response_span(tokenizer, p, r, max_length, group, eos, encoded) for p, r in zip(prompts, responses)]
