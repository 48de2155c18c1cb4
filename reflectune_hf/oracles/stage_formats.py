"""The answer shapes of the oracle stages, sized to their token budget, and the per-row format outcome.

`stage_answer_format` is what a stage with `structured` on puts in its requests'
`answer_format`; `format_outcome` is what every reflected split records per row
(`format_outcome` column) and what `report.summarize`, the card and the CLI's closing table count.

Example:
    >>> from reflectune_hf.oracles.stage_formats import format_outcome, stage_answer_format
    >>> stage_answer_format("response", max_tokens=2048).fields[0].marker
    'Better Answer'
    >>> format_outcome("ok", 2)
    'after_reask'
"""

from __future__ import annotations

import re
from typing import Optional

from .structured import FIELD_FIRST_RE, AnswerFormat, Field, MarkedFields, RankingAnswer, ScoreLine


# --------------------------------------------------------------------------- the stages' shapes

CHARS_PER_TOKEN = 3  # a low estimate, so the bounded parts fit in the stage's max_tokens


def _budget(max_tokens: Optional[int]) -> int:
    return CHARS_PER_TOKEN * max(int(max_tokens or 2048) - 24, 16)


def stage_answer_format(stage: str, max_tokens: Optional[int] = None, num_responses: int = 4) -> AnswerFormat:
    """The answer shape of a stage (`"compress"`, `"instruction"`, `"response"`, `"judge"`,
    `"ranking"`), its lengths sized to `max_tokens` (3 characters a token, a low estimate): the
    analysis and every field but the last take at most a fifth of the budget each, so the last
    field always starts before the budget ends (a last field cut by `max_tokens` still parses).

    Example:
        >>> from reflectune_hf.oracles.stage_formats import stage_answer_format
        >>> shape = stage_answer_format("instruction", max_tokens=192)
        >>> [f.marker for f in shape.fields], shape.analysis_max_chars
        (['New Instruction', 'New Answer'], 100)
    """
    chars = _budget(max_tokens)
    fifth = max(chars // 5, 20)
    if stage == "compress":
        return MarkedFields((Field("New Instruction", min(chars, 8000)),))
    if stage == "instruction":
        analysis, instruction = min(fifth, 600), min(fifth, 800)
        return MarkedFields((Field("New Instruction", instruction),
                             Field("New Answer", min(max(chars - analysis - instruction, 20), 6000))), analysis)
    if stage == "response":
        analysis = min(fifth, 600)
        return MarkedFields((Field("Better Answer", min(max(chars - analysis, 20), 6000)),), analysis)
    if stage == "judge":
        return ScoreLine(min(max(chars - 10, 20), 1500))
    if stage == "ranking":
        return RankingAnswer(num_responses, min(fifth, 600), min(max(chars // 2, 20), 3000))
    raise ValueError(f"unknown stage {stage!r}: one of compress, instruction, response, judge, ranking")


def fields_at_bound(shape: Optional[AnswerFormat], text: str) -> list[str]:
    """The markers of `shape`'s fields whose text in `text` reached the field's length bound.

    Under a grammar, regex or schema the backend ends a field when it reaches `max_chars`, so
    the model did not end it: the answer was cut, like one cut by the token limit, even though
    the backend reports `finish_reason="stop"`. The stages treat such an answer as `"length"`
    (re-asked with twice the budget, `truncated` when kept). Only `MarkedFields` carry text
    fields that rows keep; other shapes (the judge's explanation, Tuna's analysis) give []. A
    field longer than its bound was not enforced (a plain backend, or JSON without length
    keywords): the model ended it, so it is not listed.

    Example:
        >>> from reflectune_hf.oracles.stage_formats import fields_at_bound
        >>> from reflectune_hf.oracles.structured import Field, MarkedFields
        >>> shape = MarkedFields((Field("New Instruction", 10), Field("New Answer", 50)))
        >>> fields_at_bound(shape, "[New Instruction] Name three [End]\\n[New Answer] Red, blue. [End]")
        ['New Instruction']
        >>> fields_at_bound(shape, "[New Instruction] Name two. [End]\\n[New Answer] Red, blue. [End]")
        []
        >>> fields_at_bound(shape, "[New Instruction] Name three birds. [End]\\n[New Answer] Red, blue. [End]")
        []
    """
    if not isinstance(shape, MarkedFields) or not text:
        return []
    cut, start = [], 0
    for f in shape.fields:
        found = re.compile(rf"\[{re.escape(f.marker)}\] (.*?) \[End\]", re.DOTALL).search(text, start)
        if found is None:
            break
        body = found.group(1)  # an enforced field holds max_chars units, a "[x" pair being one unit
        first = re.match(FIELD_FIRST_RE, body)  # under a regex its first unit holds up to 5 ("yes", "yours")
        extra = len(first.group(0)) - 1 if first else 0  # (under a JSON schema, one: maxLength counts characters)
        if f.max_chars <= len(body) <= f.max_chars + extra + body.count("["):
            cut.append(f.marker)
        start = found.end()
    return cut


# Finish reasons of an answer stopped before its end: by the token limit, or by the provider's content filter
# (its text is what came before the cut). Re-asked, and `truncated` when kept: never `ok`.
CUT_REASONS = frozenset({"length", "content_filter"})


# --------------------------------------------------------------------------- the measured format rate

FORMAT_OUTCOMES = ("first_try", "after_reask", "fallback", "none")
_PARSED = ("ok",)
_NO_ANSWER = ("oracle_error", "no_input", "empty_input", "invalid_text", "")  # no answer: failed, or no call


def format_outcome(status: Optional[str], attempts: Optional[int]) -> str:
    """How a row's oracle answer met the format, from its step's status and answers requested:
    `first_try` (parsed, no re-ask), `after_reask` (parsed after a re-ask), `fallback` (never
    parsed in full: the row kept a previous value for some field) or `none` (no answer: an oracle
    error, or no call).

    Example:
        >>> from reflectune_hf.oracles.stage_formats import format_outcome
        >>> [format_outcome(s, a) for s, a in (("ok", 1), ("ok", 2), ("failed", 2), ("oracle_error", 1))]
        ['first_try', 'after_reask', 'fallback', 'none']
    """
    if status in _NO_ANSWER or status is None:
        return "none"
    if status in _PARSED:
        return "first_try" if (attempts or 1) <= 1 else "after_reask"
    return "fallback"
