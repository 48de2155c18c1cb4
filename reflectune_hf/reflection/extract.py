"""Regex extraction of the reflected pairs from the oracle's raw text, with a status per row.

The oracle is asked (REFERENCE.md §3-§5) to answer in the format `[New Instruction] ... [End]`
`[New Answer] ... [End]` (instruction reflection) or `[Better Answer] ... [End]` (response
reflection). Real oracles drift from it: they wrap markers in markdown (`**[New Instruction]**`,
`### New Answer`), add a colon (`[Better Answer]:`, `New Instruction:`), stop without `[End]`,
echo the format line with its placeholders, refuse, or write code that contains brackets. This
module parses all of that and records what happened in `reflection_status`:

- `ok`: every field of the stage was extracted.
- `instruction_fallback`: instruction reflection only: the new answer was extracted, the
  instruction was not, so the previous instruction is kept.
- `output_fallback`: instruction reflection only: the new instruction was extracted, the answer
  was not, so the previous output is kept (the reference does the same; filter on the status to
  drop such pairs).
- `failed`: the oracle answered but nothing usable was extracted; the row is unchanged.
- `truncated`: the kept answer was cut by the token limit or the provider's content filter
  (`reflection_finish_reason` is `"length"` or `"content_filter"`): nothing is taken from it, the
  row is unchanged (`reflection_raw` keeps the text).
- `empty_input`: the instruction or the output is empty, None or blank: no request was sent, the
  row is unchanged.
- `invalid_text`: a text of the row is not valid UTF-8 (a lone surrogate): no request was sent,
  the row is unchanged.
- `oracle_error`: the oracle failed (`reflection_error` is set); the row is unchanged.

Only `ok` (and, for the answer, `instruction_fallback`) rows hold a reflected pair;
`NOT_REFLECTED` lists the statuses whose row still holds its previous response.

Fixes of the reference's bugs (REFERENCE.md §5): an answer that mentions or *is* "N/A", "None"
or "Nothing" is kept (`print()` returns None); only an empty field or the format's own
placeholder ("your answer", "<insert your instruction here>") falls back, not a field that
merely contains the words; only a bracketed `[End]` terminates a segment, so "Endangered" and
"the End of the chapter" survive; fallbacks are recorded.

Markdown and numbering are removed only where they belong to a marker: the unpaired `**` of
`**[Better Answer]** ... **[End]**` or `Robin**[End]**`, and the "3." of a cut "\\n\\n3. [New Answer]".
The answer's own `**` ("**kwargs", "2**3", "written with ** [End]") and its last line ("The sum
is:\\n12. [End]") are kept (see `_clean`).

Inside a bracketed segment (`[Better Answer] ... [End]`) only `[End]`, another bracketed marker
or a loose marker opening a line ("3. New Answer: ...") ends the text: a loose label in the
middle of a line ("Label the column 'New Answer:'") is content, not a marker.

Several segments: instruction reflection takes the first usable `[New Instruction]` and the
first usable `[New Answer]` (as the reference does); response reflection needs exactly one
distinct usable `[Better Answer]` (the reference re-asks on zero or several and then keeps the
original: the re-ask happens in `ReflectResponse`, `format_retries`).

Example:
    >>> from reflectune_hf.reflection.extract import extract_response_reflection
    >>> batch = {"instruction": ["Name a bird."], "output": ["Cat."],
    ...          "reflection_raw": ["1. Wrong animal.\\n2. **[Better Answer]** Robin. [End]"]}
    >>> out = extract_response_reflection(batch)
    >>> out["output"], out["reflection_status"]
    (['Robin.'], ['ok'])
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Mapping, Optional

from ..data import batch_size_of, require_columns, text_column
from ..oracles.stage_formats import CUT_REASONS
from ..utils import versioned
from .row_checks import is_valid_text, skip_reason

STATUSES = ("ok", "instruction_fallback", "output_fallback", "failed", "truncated", "empty_input", "invalid_text",
            "oracle_error")
# Statuses of a row whose response was not rewritten by its reflection (what selection discards).
NOT_REFLECTED = frozenset({"output_fallback", "failed", "truncated", "empty_input", "invalid_text", "oracle_error"})

_LABELS = {
    "instruction": r"new\s+instruction",
    "answer": r"new\s+answer",
    "better": r"better\s+answer",
}
_DECO = r"(?:\*\*|__)"


def _marker_patterns(label: str) -> tuple[re.Pattern, re.Pattern]:
    """(bracketed form, loose forms) of one marker label; both case-insensitive."""
    bracketed = re.compile(
        rf"(?P<a>{_DECO})?\[[ \t]*{_DECO}?[ \t]*{label}[ \t]*:?[ \t]*{_DECO}?[ \t]*\](?(a){_DECO}?)"
        rf"(?:[ \t]*[:：](?:[ \t]*{_DECO}(?=\s))?)?",
        re.I,
    )
    loose = re.compile(
        # "New Instruction:", "**New Instruction:**", "**New Instruction**:"
        rf"(?<![\w\[])(?:{_DECO})?{label}(?:{_DECO})?[ \t]*[:：](?:[ \t]*{_DECO}(?=\s))?"
        # a heading or bold line of its own: "### New Answer", "**New Answer**"
        rf"|^[ \t]*(?:\#{{1,6}}[ \t]*)?(?:{_DECO})?{label}(?:{_DECO})?[ \t]*:?[ \t]*$",
        re.I | re.M,
    )
    return bracketed, loose


_MARKERS = {name: _marker_patterns(label) for name, label in _LABELS.items()}
# Only a bracketed End terminates ("[End]", "**[END]**", "[End of Answer]", or a closing tag such as
# "[/New Instruction]" or "[/End]"), never a bare word, and never an index such as `arr[end]`
# (preceded by a word character).
_END = re.compile(
    rf"(?<!\w){_DECO}?\[[ \t]*{_DECO}?[ \t]*(?:(?:the\s+)?end(?:\s+of\s+(?:the\s+)?(?:new\s+|better\s+)?"
    rf"(?:answer|instruction|input))?|/[ \t]*(?:end|{'|'.join(_LABELS.values())}))[ \t]*{_DECO}?[ \t]*\]{_DECO}?",
    re.I,
)
# What may precede a loose marker that opens its line: indentation, bullets, "3." / "**3.**", "###".
_LINE_OPENER = re.compile(rf"[ \t]*(?:(?:\#{{1,6}}|[-*+>]|{_DECO}?\d{{1,2}}[.)]{_DECO}?)[ \t]*)*")
_CODE = re.compile(r"(`{3,}|~{3,}).*?\1|`[^`\n]+`", re.S)  # a fence closes with its own length: ```` holds ```
# Enumerator lines ("\n\n3.", "\n**2)**") that open the next numbered part; cut only before a marker.
_TRAILING_ENUMERATOR = re.compile(rf"(?:\n[ \t]*{_DECO}?\d{{1,2}}[.)]{_DECO}?[ \t]*)+\Z")
# The reference's own cut of the new instruction (REFERENCE.md §5), whatever ends the segment.
_REFERENCE_TAIL = re.compile(r"\n\n3\.\Z")
# The format's own placeholders ("your answer", "<insert your new instruction here>") and echoes of
# its labels; never a value: "None", "N/A" or "Nothing" can be the real answer.
_PLACEHOLDER = re.compile(
    r"(?:(?:insert|write|put|enter)\s+)?(?:your|the)\s+(?:new\s+|better\s+|improved\s+)?(?:instruction|answer)"
    r"(?:\s+here)?|(?:new|better)\s+(?:instruction|answer)|instruction|answer",
)
_REFUSE = (
    r"(?:cannot|can't|can\s+not|am\s+unable\s+to|'m\s+unable\s+to|am\s+not\s+able\s+to|won't|will\s+not|"
    r"won't\s+be\s+able\s+to|will\s+not\s+be\s+able\s+to|must\s+decline\s+to)\s+(?:help|assist|provide|comply|"
    r"fulfil+|answer|generate|create|write|rewrite|complete|judge|evaluate|engage|respond|do\s+th(?:at|is))\b"
)
# A refusal opens the field: "I'm sorry, but I can't help with that", "As an AI language model,
# I cannot ...". "Unfortunately, I won't be able to attend" (a real answer) is not one.
_REFUSAL = re.compile(
    rf"^\W*(?:(?:(?:i'm|i\s+am)\s+(?:sorry|afraid)|sorry|i\s+apologi[sz]e|unfortunately)\b[^\n]{{0,80}}?\bi\s*{_REFUSE}"
    r"|as\s+an\s+ai(?:\s+language\s+model)?\b[^\n]{0,40}?\bi\s+(?:cannot|can't|can\s+not|do\s+not|don't|am\s+(?:not\s+able|unable))"
    rf"|i\s*{_REFUSE})",
    re.I,
)


def _mask_code(text: str) -> str:
    """`text` with the inside of code spans blanked (same length), so markers there are ignored."""
    return _CODE.sub(lambda m: re.sub(r"[^\n]", "\x00", m.group(0)), text)


def _markers(masked: str) -> list[tuple[int, int, str, str]]:
    """All markers as (start, end, label, kind), sorted; kind is "bracketed", "line" (a loose
    marker opening its line; it starts where the line does, so a "3. " before "New Answer:" is
    not left at the end of the previous segment) or "inline" (a loose marker after other text on
    its line). Per label, the bracketed form wins when present (as in the reference): a loose
    "better answer:" in the analysis is prose, not a marker."""
    found = []
    newlines = None  # positions of "\n", computed on the first loose marker
    for name, (bracketed, loose) in _MARKERS.items():
        hits = [(m.start(), m.end(), name, "bracketed") for m in bracketed.finditer(masked)]
        for m in [] if hits else loose.finditer(masked):
            if newlines is None:
                newlines = [i for i, c in enumerate(masked) if c == "\n"]
            k = bisect_left(newlines, m.start())
            line = newlines[k - 1] + 1 if k else 0
            opens = _opens_line(masked, line, m.start())
            hits.append((line if opens else m.start(), m.end(), name, "line" if opens else "inline"))
        found.extend(hits)
    return sorted(found)


def _opens_line(masked: str, line: int, start: int) -> bool:
    """True when only indentation, bullets or an enumerator stand between `line` and `start`."""
    match = _LINE_OPENER.match(masked, line, start)  # stops at the first other character
    return match is not None and match.end() == start


def _first_at_or_after(sorted_positions: list[int], stop: int, default: int) -> int:
    k = bisect_left(sorted_positions, stop)
    return sorted_positions[k] if k < len(sorted_positions) else default


def _limit(stop: int, ends: list[int], starts: list[int], size: int) -> int:
    """Where a segment that starts at `stop` ends: the first `[End]` or marker at or after it
    (`ends` and `starts` sorted: a binary search, so a row with many markers stays linear)."""
    return min(_first_at_or_after(ends, stop, size), _first_at_or_after(starts, stop, size))


def _inside(spans: list[tuple[int, int]], position: int) -> bool:
    """True when `position` falls in one of `spans`, sorted non-overlapping `(start, end)` pairs."""
    k = bisect_right(spans, (position, float("inf"))) - 1
    return k >= 0 and spans[k][0] <= position < spans[k][1]


def _clean(segment: str, opened: bool, before_marker: bool, closed: bool, instruction: bool = False) -> str:
    """The text of a raw segment (what follows a marker, up to its end).

    Args:
        segment: the raw text between the marker and what ends it, unstripped.
        opened: True when the marker holds an unpaired `**` ("**[Better Answer]:", "**New Answer:").
        before_marker: True when the next marker ends the segment (not `[End]` or the end of the text).
        closed: True when `[End]` or a marker ends the segment (False: the end of the text).
        instruction: the segment is a new instruction (unquoted, and the reference's tail is cut).

    Only what belongs to a marker is removed, never the answer's own text:

    - `**` glued to the marker before it when followed by a space ("[Better Answer]** Robin") or
      when it closes the marker's own `**` ("**New Answer:**Robin"), or glued to the `[End]` /
      marker after it ("Robin**[End]**"), and only when it is the unpaired one (an odd count of
      `**`). "**kwargs", "**Note:**", "2**3" and "written with ** [End]" are the answer's text.
    - enumerator lines ("\\n\\n3.", "\\n**2)**") right before the next marker: the number of that
      marker's part. Before `[End]` or at the end of the text they are the answer's last line
      ("The sum is:\\n12."), except the new instruction's "\\n\\n3.", which the reference cuts.
    """
    if segment.count("**") % 2:  # the other half of a bold marker: "**[Better Answer]** ... **[End]**"
        if closed and segment.endswith("**"):
            segment = segment[:-2]
        elif segment.startswith("**") and (opened or re.match(r"\*\*(?:\s|\Z)", segment)):
            segment = segment[2:]
    text = re.sub(r"\A[:：][ \t]*", "", segment.strip()).rstrip()
    if before_marker:
        text = _TRAILING_ENUMERATOR.sub("", text)  # "...\n\n3. [New Answer]": the next part's number
    if instruction:
        text = _REFERENCE_TAIL.sub("", text)
    text = text.strip()
    if instruction and len(text) > 1 and text[0] == text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    return text


def segments(text: str, label: str) -> list[str]:
    """Every segment of `text` after a `label` marker ("instruction", "answer" or "better"), up to
    the next `[End]`, the next marker of any label (for a bracketed marker: the next bracketed
    one or a loose one opening a line), or the end of the text. Markers and `[End]` inside code
    spans do not count.

    Example:
        >>> from reflectune_hf.reflection.extract import segments
        >>> segments("[New Instruction] A [End] [New Answer]: B", "answer")
        ['B']
        >>> segments("[Better Answer] Label the column 'New Answer:' and fill it. [End]", "better")
        ["Label the column 'New Answer:' and fill it."]
    """
    if label not in _LABELS:
        raise ValueError(f"Unknown marker label {label!r}; choose one of {sorted(_LABELS)}")
    masked = _mask_code(text or "")
    markers = _markers(masked)
    ends = [m.start() for m in _END.finditer(masked)]
    # A bracketed segment ends at [End], a bracketed marker or a marker opening a line; an inline
    # loose marker inside it ("Label the column 'New Answer:'") is its text, not a marker.
    strong = [start for start, _, _, kind in markers if kind != "inline"]
    spans = {stop: _limit(stop, ends, strong, len(masked)) for _, stop, _, kind in markers if kind == "bracketed"}
    ordered = sorted(spans.items())  # each ends before the next bracketed marker: no overlap
    markers = [m for m in markers if m[3] != "inline" or not _inside(ordered, m[0])]
    starts = [start for start, _, _, _ in markers]
    end_set = set(ends)
    out = []
    for start, stop, name, _ in markers:
        if name == label:
            limit = spans.get(stop, _limit(stop, ends, starts, len(masked)))
            closed = limit < len(masked)
            opened = text[start:stop].count("**") % 2 == 1
            out.append(_clean(text[stop:limit], opened, before_marker=closed and limit not in end_set, closed=closed,
                              instruction=label == "instruction"))
    return out


def is_usable(segment: str) -> bool:
    """False for an empty field, a placeholder of the format ("your answer"), or a refusal; a value
    such as "None", "N/A" or "Nothing" is a real answer.

    Example:
        >>> from reflectune_hf.reflection.extract import is_usable
        >>> is_usable("your answer"), is_usable("<insert your instruction here>"), is_usable("None")
        (False, False, True)
    """
    norm = re.sub(r"[\s*_`\"'<>\[\]().:!\-]+", " ", segment.lower()).strip()
    if not norm or _PLACEHOLDER.fullmatch(norm):
        return False
    return not _REFUSAL.match(segment.replace("\u2019", "'"))


# The prompts' own scaffolding ("[The Start of Input]", "[System]"): in a new instruction it is an
# echo of the prompt, not an instruction (the input it framed may be cut at "[The End of Input]").
_SCAFFOLD = re.compile(
    r"\[(?:the\s+)?(?:start|end)\s+of\s+(?:the\s+)?(?:input|answer)\]|\[(?:instruction|system|question)\]", re.I)


def _first_usable(text: str, label: str) -> Optional[str]:
    return next((s for s in segments(text, label)
                 if is_usable(s) and not (label == "instruction" and _SCAFFOLD.search(s))), None)


def parse_instruction_reflection(text: str) -> tuple[Optional[str], Optional[str]]:
    """(new instruction, new answer) of an instruction-reflection answer; None where unusable.

    Example:
        >>> from reflectune_hf.reflection.extract import parse_instruction_reflection
        >>> parse_instruction_reflection("[New Instruction] Do X.\\n\\n3. [New Answer] Done. [End]")
        ('Do X.', 'Done.')
    """
    return _first_usable(text, "instruction"), _first_usable(text, "answer")


def parse_response_reflection(text: str) -> Optional[str]:
    """The better answer of a response-reflection answer: exactly one distinct usable segment, else
    None (zero or several differing answers are ambiguous, as in the reference).

    Example:
        >>> from reflectune_hf.reflection.extract import parse_response_reflection
        >>> parse_response_reflection("format: [Better Answer] your answer [End]\\n[Better Answer] 42 [End]")
        '42'
    """
    usable = list(dict.fromkeys(s for s in segments(text, "better") if is_usable(s)))
    return usable[0] if len(usable) == 1 else None


def parse_compressed_instruction(text: str) -> Optional[str]:
    """The instruction of a compression answer (`[New Instruction] ... [End]`), or None."""
    return _first_usable(text, "instruction")


def instruction_status(instruction: Optional[str], answer: Optional[str]) -> str:
    """Status of an instruction-reflection parse (see the module docstring)."""
    if instruction is not None and answer is not None:
        return "ok"
    if answer is not None:
        return "instruction_fallback"
    return "output_fallback" if instruction is not None else "failed"


def _optional(batch: Mapping, name: str, n: int, stage: str) -> list[str]:
    return text_column(batch, name, stage) if name in batch else [""] * n


def _inputs(batch: Mapping, stage: str, reflect: str) -> tuple:
    """(instructions, outputs, inputs, raws, errors, finish reasons) of a batch to extract."""
    require_columns(batch, ["instruction", "output", "reflection_raw"], f"{stage} (run {reflect} first)")
    n = batch_size_of(batch)
    return (
        text_column(batch, "instruction", stage),
        text_column(batch, "output", stage),
        _optional(batch, "input", n, stage),
        text_column(batch, "reflection_raw", stage),
        _optional(batch, "reflection_error", n, stage),
        _optional(batch, "reflection_finish_reason", n, stage),
    )


def _unparsed_status(skip: str, error: str, finish_reason: str) -> str:
    """The status of a row nothing is parsed from (`""` when its answer is to be parsed)."""
    if skip:
        return skip
    if error:
        return "oracle_error"
    return "truncated" if finish_reason in CUT_REASONS else ""


@versioned
def extract_instruction_reflection(batch: Mapping) -> dict:
    """Write the new pair of an instruction reflection into `instruction` / `output`.

    For `ds.map(extract_instruction_reflection, batched=True)` after `ReflectInstruction`.

    Input columns: `instruction`, `output`, `reflection_raw` (str), optionally `reflection_error`
    and `reflection_finish_reason`.
    Output columns: `instruction`, `output` (new values, or the previous ones where they fall
    back), `reflection_status` in `STATUSES` (see the module docstring). `reflection_raw`, `id` and every other
    column are kept unchanged; the row count never changes.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.reflection.extract import extract_instruction_reflection
        >>> ds = Dataset.from_dict({"id": [0, 1], "instruction": ["Hi", "Add 2+2"], "output": ["Hello", "5"],
        ...     "reflection_raw": ["**[New Instruction]**: Greet a new colleague warmly. **[End]**\\n"
        ...                        "[New Answer] Welcome aboard! [End]", "I cannot judge this."]})
        >>> out = ds.map(extract_instruction_reflection, batched=True)
        >>> list(out["instruction"]), list(out["reflection_status"])
        (['Greet a new colleague warmly.', 'Add 2+2'], ['ok', 'failed'])
    """
    stage = "extract_instruction_reflection"
    instructions, outputs, _, raws, errors, reasons = _inputs(batch, stage, "ReflectInstruction")
    new_instructions, new_outputs, statuses = [], [], []
    for instruction, output, raw, error, reason in zip(instructions, outputs, raws, errors, reasons):
        status = _unparsed_status(skip_reason(instruction, output), error, reason)
        if status:
            new_ins, new_out = None, None
        else:
            new_ins, new_out = parse_instruction_reflection(raw)
            status = instruction_status(new_ins, new_out)
        new_instructions.append(instruction if new_ins is None else new_ins)
        new_outputs.append(output if new_out is None else new_out)
        statuses.append(status)
    return {"instruction": new_instructions, "output": new_outputs, "reflection_status": statuses}


@versioned
def extract_response_reflection(batch: Mapping) -> dict:
    """Write the better answer of a response reflection into `output`.

    For `ds.map(extract_response_reflection, batched=True)` after `ReflectResponse`.

    Input columns: `instruction`, `output`, `reflection_raw` (str), optionally `input`,
    `reflection_error` and `reflection_finish_reason`.
    Output columns: `output` (the better answer, or the previous output), `reflection_status` in
    {`ok`, `failed`, `truncated`, `empty_input`, `invalid_text`, `oracle_error`}. Every other
    column is kept; the row count never changes.

    Example:
        >>> from reflectune_hf.reflection.extract import extract_response_reflection
        >>> out = extract_response_reflection({"instruction": ["Name an endangered animal."], "output": ["Dog."],
        ...     "reflection_raw": ["[Better Answer] Endangered: the Amur leopard. [End]"]})
        >>> out["output"]
        ['Endangered: the Amur leopard.']
    """
    stage = "extract_response_reflection"
    instructions, outputs, inputs, raws, errors, reasons = _inputs(batch, stage, "ReflectResponse")
    new_outputs, statuses = [], []
    for instruction, output, input, raw, error, reason in zip(instructions, outputs, inputs, raws, errors, reasons):
        skip = "invalid_text" if not is_valid_text(input) else skip_reason(instruction, output)
        status = _unparsed_status(skip, error, reason)
        better = None if status else parse_response_reflection(raw)
        new_outputs.append(output if better is None else better)
        statuses.append(status or ("ok" if better is not None else "failed"))
    return {"output": new_outputs, "reflection_status": statuses}
