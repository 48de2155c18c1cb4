"""Reading Tuna's contextual-ranking answers: the judge's `rank: [...]` list and its own reference
response (`###Response 4:`). Pure functions of the text; `ContextualRank` (in `reflectune_hf.tuna.stages`)
turns their findings into per-row statuses.

Example:
    >>> from reflectune_hf.tuna.parse import parse_ranking
    >>> parse_ranking("Response 0: 9\\nResponse 4: 15\\nrank: [4, 0, 1]", 5).rank
    [4, 0, 1]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The label stays on its line: the list may follow on the next lines ("Ranking:\n1. Response 4\n...").
_RANK_LABEL = re.compile(r"\brank(?:ing)?[ \t*_]*:[ \t*_]*", re.IGNORECASE)
_INDEX = r"(?<!\w)-?\d+"
_RESPONSE_INDEX = re.compile(r"\bresponse[ \t]*#?[ \t]*(" + _INDEX + ")", re.IGNORECASE)
_LIST_ITEM = re.compile(r"[ \t>]*(?:[-*+\u2022]|\d+[.)])[ \t]+(.*)")  # "1. Response 4", "- Response 2", "3) 0"
# A line that is a ranking by itself: indices, "Response", and separators only ("Response 4 > Response 0").
_RANK_SEPARATORS = r"[\d\s\[\](),;>=<|/*_.\-\u2013\u2014\u2192]*"  # no ":": "Response 0: 12" is a score line
_RANK_LINE = re.compile(_RANK_SEPARATORS + r"\d" + _RANK_SEPARATORS)
_REFERENCE_START = r"#+[ \t]*Response[ \t]*{index}\b[ \t]*:?"
_JUDGE_WORDS = r"(?:duplicat|identical|unique|score|rating|rate\b|rank|compar|evaluat)"
_REFERENCE_END = re.compile(  # where the judge's reference response stops: its next step
    r"^[ \t>*_-]*(?:\d+[.)][ \t]*)?(?:"
    r"#+[ \t]*(?:\d+[.)][ \t]*)?(?:response|third|fourth|fifth|last|final|step|" + _JUDGE_WORDS + ")"
    r"|(?:third|fourth|fifth|last|finally|step[ \t]*\d)\b[^\n]*?" + _JUDGE_WORDS  # the prompt's later steps
    + r"|(?:there (?:are|is) )?(?:no )?duplicat"  # the duplicate check
    r"|response[ \t]*\d+[ \t*]*:[ \t*]*\[?[ \t]*\d"  # a score line
    r"|rank(?:ing)?[\s*_]*:"  # the ranking
    r")", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ParsedRanking:
    """What `parse_ranking` read: the cleaned ranking, what was dropped, and whether one was found."""

    rank: list
    found: bool
    duplicates: list
    out_of_range: list
    unclosed: bool = False  # a bracketed list without its closing bracket: the answer stopped inside it

    @property
    def repaired(self) -> bool:
        return bool(self.duplicates or self.out_of_range)


def parse_ranking(text: str, num_candidates: int) -> ParsedRanking:
    """Read the judge's ranking: the list after the last `rank:` or `ranking:` label that holds a
    number (any case, markdown bold allowed). The list is bracketed (`[4, 0, 2]`), the rest of the
    label's line (`Response 3 > Response 1 > Response 2`, `[2] > [1] > [4]`), or, when that line holds no number,
    the lines below it: a numbered or bulleted list (`1. Response 4`, `- Response 2`, one index
    per item, its list number ignored) or a single ranking line. "Response k" gives the index k
    when present, so scores written beside it (`Response 4 (15 points)`) are not read as indices.

    Indices outside `0..num_candidates-1` and repeated indices (after the first) are dropped and
    reported; `unclosed` says a bracketed list has no closing bracket (the answer stopped inside
    it, so the ranking may be incomplete). (The reference reads every number after the first
    `rank:` to the end of the text, score lines and prose included.)

    Example:
        >>> from reflectune_hf.tuna.stages import parse_ranking
        >>> parse_ranking("Response 4: 15\\nrank: [4, 2, 2, 0, 7]", 5).rank
        [4, 2, 0]
    """
    for match in reversed(list(_RANK_LABEL.finditer(text or ""))):
        numbers = _ranked_indices(text[match.end():])
        if not numbers:
            continue  # e.g. the prompt's format echoed back: "rank: [i, j ,k, l, m]"
        rank, duplicates, out_of_range = [], [], []
        for k in numbers:
            if not 0 <= k < num_candidates:
                out_of_range.append(k)
            elif k in rank:
                duplicates.append(k)
            else:
                rank.append(k)
        rest = text[match.end():]
        unclosed = rest[:1] in ("[", "(") and ("]" if rest[0] == "[" else ")") not in rest
        return ParsedRanking(rank, True, duplicates, out_of_range, unclosed)
    return ParsedRanking([], False, [], [])


def _indices(span: str) -> list[int]:
    """The indices in a piece of a ranking: the numbers after "Response" when there are any, else all;
    but a list of bare numbers before the first "Response" ("2, 1, 4. Response 3 is short") is the ranking."""
    first = _RESPONSE_INDEX.search(span)
    bare = re.findall(_INDEX, span[:first.start()] if first else span)
    return [int(x) for x in (bare if first is None or len(bare) > 1 else _RESPONSE_INDEX.findall(span))]


def _ranked_indices(rest: str) -> list[int]:
    """The indices of the ranking that starts right after a `rank:` label (`rest`: the text after it)."""
    first, *below = rest.split("\n")
    if _RANK_LINE.fullmatch(_RESPONSE_INDEX.sub(r"\1", first)):  # "[2] > [1] > [4]": all, not "[2]" alone
        return _indices(first)
    if rest.startswith(("[", "(")):
        close = rest.find("]" if rest[0] == "[" else ")")
        span = rest[1:close] if close >= 0 else first
        if re.search(r"\d", span):
            return _indices(span)
    if re.search(r"\d", first):
        return _indices(first)
    # No index on the label's line ("Ranking:", "Ranking: (best first)"): the ranking is below it.
    lines = [line for line in below if line.strip()]  # blank lines between items are allowed
    if lines and _LIST_ITEM.fullmatch(lines[0]) is None:
        # One ranking line ("[4, 0, 1]", "Response 4 > Response 0"); prose or a score line is none.
        return _indices(lines[0]) if _RANK_LINE.fullmatch(_RESPONSE_INDEX.sub(r"\1", lines[0])) else []
    numbers = []
    for line in lines:
        item = _LIST_ITEM.fullmatch(line)
        if item is None:
            break  # the list has ended
        found = _indices(item.group(1))
        numbers += found[:1]  # one index per item: "1. Response 4 (15 points)" is 4
    return numbers


def extract_reference_response(text: str, index: int = 4) -> str:
    """The judge's own response (`###Response 4:` in Tuna's prompt), or `""` when absent.

    It runs to the next step of the answer (a heading, "Third"/"Fourth"/"Last", the duplicate
    check, a score line `Response k: 12`, the ranking) or the end of the text. (The reference
    stops at the first blank line and finds nothing at the very end of a text.)

    Example:
        >>> from reflectune_hf.tuna.stages import extract_reference_response
        >>> extract_reference_response("###Response 4:\\nParis.\\n\\nIt is on the Seine.\\n\\nThird, no duplicates.")
        'Paris.\\n\\nIt is on the Seine.'
    """
    start = re.search(_REFERENCE_START.format(index=index), text or "", re.IGNORECASE)
    if start is None:
        return ""
    body = text[start.end():]
    end = _REFERENCE_END.search(body, 1 if body[:1] not in "\n" else 0)
    return (body[:end.start()] if end else body).strip()
