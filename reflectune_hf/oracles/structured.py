"""Answer shapes: what an oracle stage needs its answer to look like, stated once, enforced by each backend.

A stage describes the answer it can parse (the paper's prompts stay byte-identical); the backend
enforces it the way it natively can, and the answer always comes back as the canonical *marker
text* the stage's parser reads, so `reflection_raw` and extraction are the same on every backend:

- `MarkedFields`: marked fields in order, each `[Marker] text [End]` with a bounded length,
  optionally preceded by a bounded free-text analysis ("1. reasons ... 2. [New Instruction] ...
  [End] 3. [New Answer] ... [End]"): compression, instruction and response reflection.
- `ScoreLine`: the pairwise judge's first line of two scores, then a bounded explanation.
- `RankingAnswer`: Tuna's contextual ranking: an analysis, the judge's own `###Response N:`,
  one `Response k: score` line per response, then `rank: [i, j, ...]`.

Each shape is frozen, hashable and JSON-able (`to_dict()`, `shape_from_dict`), and renders as:

- `regex()`: a regular expression the whole answer matches (vLLM `structured_outputs.regex` /
  `guided_regex`; plain syntax: capturing groups, classes and `{m,n}` only, no look-arounds);
- `gbnf()`: a llama.cpp GBNF grammar (the `grammar` field of llama.cpp servers);
- `json_schema(bounded=True)`: a JSON schema (OpenAI `response_format`, vLLM `json`); with
  `bounded=False` the length keywords are left out (OpenAI's strict mode refuses some);
- `from_json(text)`: a JSON answer back to the canonical marker text (`ValueError` when the text
  is no JSON object of the shape).

Free text inside a field cannot hold a `[` that could open a marker (`[End]`, `[New ...]`,
`[Better ...]`, `[The end]`: a `[` followed by a space, `*`, `_`, `[`, or one of the letters
n, e, b, t); `arr[0]` or `[1, 2]` are fine. A field cannot open with the prompt's placeholder
(a lower-case "your ", as in "[Better Answer] your answer [End]"). The analysis holds no bracket and no `#` at all, so
it can never be mistaken for a field or for the judge's reference response.

Example:
    >>> import re
    >>> from reflectune_hf.oracles.structured import Field, MarkedFields
    >>> shape = MarkedFields((Field("Better Answer", max_chars=200),), analysis_max_chars=100)
    >>> text = shape.from_json('{"analysis": "Too short.", "better_answer": "Paris, on the Seine."}')
    >>> text
    'Too short.\\n[Better Answer] Paris, on the Seine. [End]'
    >>> re.fullmatch(shape.regex(), text) is not None
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

# Free text of a field: any character but `[`, or a `[` that cannot open a marker.
_FIELD_UNIT_RE = r"([^\[]|\[[^\[ \t*_nNeEbBtT])"
# A field opens with a non-space and never with the format's placeholder ("your answer", "your
# instruction" in the paper's prompts): a lower-case "your " cannot start it ("Your task", "yours" can).
FIELD_FIRST_RE = r"([^\[\sy]|y[^\[o]|yo[^\[u]|you[^\[r]|your[^\[ ])"
_ANALYSIS_UNIT_RE = r"[^\[\]#]"
_FIELD_UNIT_GBNF = r'[^\[] | "[" [^\[ \t*_nNeEbBtT]'
_FIELD_FIRST_GBNF = r'([^\[ \t\n\ry] | "y" [^\[o] | "yo" [^\[u] | "you" [^\[r] | "your" [^\[ ])'
_ANALYSIS_UNIT_GBNF = r"[^\[\]#]"


def _key(marker: str) -> str:
    """The JSON property of a marker: "New Instruction" -> "new_instruction"."""
    return re.sub(r"[^0-9a-z]+", "_", marker.lower()).strip("_")


def _check_bound(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _load_object(text: str, shape: str) -> dict:
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{shape}: the answer is not JSON ({exc}): {str(text)[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shape}: the answer is a JSON {type(data).__name__}, expected an object")
    return data


def _string(data: Mapping, key: str, shape: str, required: bool = True) -> str:
    value = data.get(key, None if required else "")
    if not isinstance(value, str):
        raise ValueError(f"{shape}: the JSON answer has no string {key!r} (keys: {sorted(data)})")
    return value


# What the stages' parser reads as a marker or an end inside text ("[End]", "**[New Answer]**"):
# a JSON value that holds one would end its field early, or give another field's answer.
_MARKER_TEXT_RE = re.compile(r"(?<!\w)\[[ \t*_]*(?:the\s+)?end\b|\[[ \t*_]*(?:new|better)\s+(?:instruction|answer)\b",
                             re.I)


def _marker_free(value: str, shape: str, key: str, marker: str = "") -> str:
    """`value` without its own `[marker] ... [End]` wrapping; ValueError when it still holds marker text."""
    if marker:
        value = re.sub(rf"\A\[{re.escape(marker)}\]:?\s*|\s*\[End\]\Z", "", value, flags=re.I).strip()
    found = _MARKER_TEXT_RE.search(value)
    if found:
        raise ValueError(f"{shape}: the JSON answer's {key!r} holds marker text {found.group(0)!r}, which would end "
                         "or replace a field of the marker text")
    return value


def _schema_object(properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _text_schema(max_chars: int, min_chars: int, bounded: bool) -> dict:
    schema: dict = {"type": "string"}
    if bounded:
        schema.update(minLength=min_chars, maxLength=max_chars)
    return schema


@dataclass(frozen=True)
class Field:
    """One marked field: `[marker] text [End]`, the text 1..`max_chars` characters long.

    Example:
        >>> from reflectune_hf.oracles.structured import Field
        >>> Field("New Instruction").key
        'new_instruction'
    """

    marker: str
    max_chars: int = 1500

    def __post_init__(self):
        if not isinstance(self.marker, str) or not re.fullmatch(r"[A-Za-z][A-Za-z ]*[A-Za-z]", self.marker):
            raise ValueError(f"Field marker must be words of letters (e.g. 'New Answer'), got {self.marker!r}")
        _check_bound("Field.max_chars", self.max_chars, 1)

    @property
    def key(self) -> str:
        return _key(self.marker)

    def to_dict(self) -> dict:
        return {"marker": self.marker, "max_chars": self.max_chars}


@dataclass(frozen=True)
class MarkedFields:
    """Marked fields in order, optionally after a free-text analysis of at most `analysis_max_chars`
    characters (0: the answer opens with the first marker).

    Canonical text: `<analysis>\\n[Marker 1] text [End]\\n[Marker 2] text [End]`. The regex and the
    grammar also allow what models write around markers: the analysis runs up to the first `[`
    (so "2. [New Instruction]" is fine), and between fields one or two newlines and an enumerator
    such as "3. " (a new line: a code span cannot run from one field into the next).

    Example:
        >>> import re
        >>> from reflectune_hf.oracles.structured import Field, MarkedFields
        >>> shape = MarkedFields((Field("New Instruction", 300), Field("New Answer", 900)), analysis_max_chars=400)
        >>> text = "1. Vague.\\n2. [New Instruction] Do X. [End]\\n3. [New Answer] Done. [End]"
        >>> bool(re.fullmatch(shape.regex(), text))
        True
        >>> sorted(shape.json_schema()["properties"])
        ['analysis', 'new_answer', 'new_instruction']
    """

    fields: tuple
    analysis_max_chars: int = 0

    kind = "marked_fields"

    def __post_init__(self):
        fields = tuple(Field(**f) if isinstance(f, Mapping) else f for f in self.fields)
        if not fields or not all(isinstance(f, Field) for f in fields):
            raise ValueError(f"MarkedFields needs one or more Field(...), got {self.fields!r}")
        keys = [f.key for f in fields]
        if len(set(keys)) != len(keys) or "analysis" in keys:
            raise ValueError(f"MarkedFields: field markers must be distinct and not 'analysis', got {keys}")
        object.__setattr__(self, "fields", fields)
        _check_bound("MarkedFields.analysis_max_chars", self.analysis_max_chars, 0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fields": [f.to_dict() for f in self.fields],
                "analysis_max_chars": self.analysis_max_chars}

    def regex(self) -> str:
        parts = [f"{_ANALYSIS_UNIT_RE}{{0,{self.analysis_max_chars}}}"] if self.analysis_max_chars else []
        for i, f in enumerate(self.fields):
            if i:
                parts.append(r"\n\n?([1-9]\. ?)?")
            parts.append(f"\\[{f.marker}\\] {FIELD_FIRST_RE}{_FIELD_UNIT_RE}{{0,{f.max_chars - 1}}} \\[End\\]")
        return "".join(parts)

    def gbnf(self) -> str:
        rules = []
        root = []
        if self.analysis_max_chars:
            root.append("analysis")
            rules.append(f"analysis ::= analysis-char{{0,{self.analysis_max_chars}}}")
            rules.append(f"analysis-char ::= {_ANALYSIS_UNIT_GBNF}")
        for i, f in enumerate(self.fields):
            name = f"field-{i}"
            if i:
                root.append("gap")
            root.append(f'"[{f.marker}] " {name} " [End]"')
            rules.append(f"{name} ::= {_FIELD_FIRST_GBNF} field-char{{0,{f.max_chars - 1}}}")
        if len(self.fields) > 1:
            rules.append('gap ::= "\\n" "\\n"? ([1-9] "." " "?)?')
        rules.append(f"field-char ::= {_FIELD_UNIT_GBNF}")
        return "\n".join([f"root ::= {' '.join(root)}"] + rules) + "\n"

    def json_schema(self, bounded: bool = True) -> dict:
        properties = {}
        if self.analysis_max_chars:
            properties["analysis"] = _text_schema(self.analysis_max_chars, 0, bounded)
        for f in self.fields:
            properties[f.key] = _text_schema(f.max_chars, 1, bounded)
        return _schema_object(properties)

    def from_json(self, text: str) -> str:
        data = _load_object(text, "MarkedFields")
        lines = []
        if self.analysis_max_chars:
            analysis = _marker_free(_string(data, "analysis", "MarkedFields", required=False).strip(),
                                    "MarkedFields", "analysis")
            if analysis:
                lines.append(analysis)
        for f in self.fields:
            value = _string(data, f.key, "MarkedFields")
            text = _marker_free(value.strip(), "MarkedFields", f.key, f.marker)
            # A value cut at maxLength keeps its trailing spaces, hence its length (`fields_at_bound`).
            lines.append(f"[{f.marker}] {value.lstrip() if text == value.strip() else text} [End]")
        return "\n".join(lines)


_SCORE_RE = r"(10|[0-9](\.5)?)"
_SCORE_GBNF = '("10" | [0-9] (".5")?)'


@dataclass(frozen=True)
class ScoreLine:
    """The pairwise judge's answer: a first line with two scores from 0 to 10 (integers or halves)
    separated by a space, then a newline and an explanation of at most `explanation_max_chars`.

    Example:
        >>> import re
        >>> from reflectune_hf.oracles.structured import ScoreLine
        >>> shape = ScoreLine(explanation_max_chars=300)
        >>> shape.from_json('{"score_1": 8, "score_2": 6.5, "explanation": "A is more precise."}')
        '8 6.5\\nA is more precise.'
        >>> bool(re.fullmatch(shape.regex(), "8 6.5\\nA is more precise."))
        True
    """

    explanation_max_chars: int = 1000

    kind = "score_line"

    def __post_init__(self):
        _check_bound("ScoreLine.explanation_max_chars", self.explanation_max_chars, 1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "explanation_max_chars": self.explanation_max_chars}

    def regex(self) -> str:
        return f"{_SCORE_RE} {_SCORE_RE}\\n[^\\n][\\s\\S]{{0,{self.explanation_max_chars - 1}}}"

    def gbnf(self) -> str:
        return (f'root ::= score " " score "\\n" [^\\n] explanation-char{{0,{self.explanation_max_chars - 1}}}\n'
                f"score ::= {_SCORE_GBNF}\n"
                "explanation-char ::= [^\\x00]\n")

    def json_schema(self, bounded: bool = True) -> dict:
        score: dict = {"type": "number"}
        if bounded:
            score.update(minimum=0, maximum=10)
        return _schema_object({"score_1": dict(score), "score_2": dict(score),
                               "explanation": _text_schema(self.explanation_max_chars, 1, bounded)})

    def from_json(self, text: str) -> str:
        data = _load_object(text, "ScoreLine")
        scores = []
        for key in ("score_1", "score_2"):
            value = data.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"ScoreLine: the JSON answer has no number {key!r} (keys: {sorted(data)})")
            scores.append(f"{value:g}")
        return f"{scores[0]} {scores[1]}\n{_string(data, 'explanation', 'ScoreLine').strip()}"


@dataclass(frozen=True)
class RankingAnswer:
    """Tuna's contextual ranking of `num_responses` responses (indices 0..N-1) plus the judge's own
    reference response (index N): an analysis (no `#`, no bracket), `###Response N:` and the
    reference (no `#`: a heading would end it), one `Response k: score` line per index 0..N
    (scores 0 to 15), and `rank: [i, j, ...]` (1 to N+1 indices; repeats are repaired by the parser).
    `from_json` refuses a JSON answer whose analysis or reference holds what the text cannot.

    Example:
        >>> import re
        >>> from reflectune_hf.oracles.structured import RankingAnswer
        >>> from reflectune_hf.tuna.parse import parse_ranking
        >>> shape = RankingAnswer(num_responses=2, analysis_max_chars=200, reference_max_chars=200)
        >>> text = shape.from_json('{"analysis": "Close-ended.", "reference_response": "Blue.", '
        ...                        '"scores": [9, 4, 15], "rank": [2, 0, 1]}')
        >>> print(text)
        Close-ended.
        ###Response 2:
        Blue.
        <BLANKLINE>
        Response 0: 9
        Response 1: 4
        Response 2: 15
        rank: [2, 0, 1]
        >>> parse_ranking(text, 3).rank, bool(re.fullmatch(shape.regex(), text))
        ([2, 0, 1], True)
    """

    num_responses: int
    analysis_max_chars: int = 600
    reference_max_chars: int = 1500

    kind = "ranking"

    def __post_init__(self):
        _check_bound("RankingAnswer.num_responses", self.num_responses, 1)
        if self.num_responses > 9:
            raise ValueError(f"RankingAnswer supports up to 9 responses (one-digit indices), got {self.num_responses}")
        _check_bound("RankingAnswer.analysis_max_chars", self.analysis_max_chars, 0)
        _check_bound("RankingAnswer.reference_max_chars", self.reference_max_chars, 1)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_responses": self.num_responses,
                "analysis_max_chars": self.analysis_max_chars, "reference_max_chars": self.reference_max_chars}

    @property
    def _n(self) -> int:
        return self.num_responses

    def regex(self) -> str:
        index = f"[0-{self._n}]"
        analysis = f"{_ANALYSIS_UNIT_RE}{{0,{self.analysis_max_chars}}}\\n" if self.analysis_max_chars else ""
        scores = "".join(f"\\nResponse {k}: (1[0-5]|[0-9])" for k in range(self._n + 1))
        return (f"{analysis}###Response {self._n}:\\n[^\\s#][^#]{{0,{self.reference_max_chars - 1}}}\\n"
                f"{scores}\\nrank: \\[{index}(, {index}){{0,{self._n}}}\\]")

    def gbnf(self) -> str:
        index = f"[0-{self._n}]"
        root = ['"###Response {}:\\n" reference "\\n"'.format(self._n)]
        rules = [f"reference ::= [^ \\t\\n\\r#] [^#]{{0,{self.reference_max_chars - 1}}}",
                 f"score ::= \"1\" [0-5] | [0-9]",
                 f"index ::= {index}"]
        if self.analysis_max_chars:
            root.insert(0, '[^\\[\\]#]{0,%d} "\\n"' % self.analysis_max_chars)
        root += [f'"\\nResponse {k}: " score' for k in range(self._n + 1)]
        root.append(f'"\\nrank: [" index (", " index){{0,{self._n}}} "]"')
        return "\n".join([f"root ::= {' '.join(root)}"] + rules) + "\n"

    def json_schema(self, bounded: bool = True) -> dict:
        score: dict = {"type": "integer"}
        index: dict = {"type": "integer"}
        scores: dict = {"type": "array", "items": score}
        rank: dict = {"type": "array", "items": index}
        if bounded:
            score.update(minimum=0, maximum=15)
            index.update(minimum=0, maximum=self._n)
            scores.update(minItems=self._n + 1, maxItems=self._n + 1)
            rank.update(minItems=1, maxItems=self._n + 1)
        properties = {}
        if self.analysis_max_chars:
            properties["analysis"] = _text_schema(self.analysis_max_chars, 0, bounded)
        properties.update(reference_response=_text_schema(self.reference_max_chars, 1, bounded), scores=scores,
                          rank=rank)
        return _schema_object(properties)

    def from_json(self, text: str) -> str:
        data = _load_object(text, "RankingAnswer")
        reference = _string(data, "reference_response", "RankingAnswer").strip()
        numbers = {}
        for key in ("scores", "rank"):
            value = data.get(key)
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"RankingAnswer: the JSON answer has no list of integers {key!r} "
                                 f"(keys: {sorted(data)})")
            numbers[key] = value
        lines = []
        analysis = _string(data, "analysis", "RankingAnswer", required=False).strip() if self.analysis_max_chars else ""
        # As in `regex()`: a "#" ("## Step 2", "###Response 4:") ends the reference early or starts another one.
        for key, value, banned in (("reference_response", reference, "#"), ("analysis", analysis, "#[]")):
            if any(c in value for c in banned):
                raise ValueError(f"RankingAnswer: the JSON answer's {key!r} holds one of {banned!r}, which the "
                                 "ranking text cannot hold there")
        if analysis:
            lines.append(analysis)
        lines += [f"###Response {self._n}:", reference, ""]
        lines += [f"Response {k}: {s}" for k, s in enumerate(numbers["scores"])]
        lines.append(f"rank: [{', '.join(str(k) for k in numbers['rank'])}]")
        return "\n".join(lines)


AnswerFormat = Union[MarkedFields, ScoreLine, RankingAnswer]
SHAPES = {cls.kind: cls for cls in (MarkedFields, ScoreLine, RankingAnswer)}


def shape_from_dict(data: Mapping) -> AnswerFormat:
    """The shape of a `to_dict()` form (e.g. read back from a JSONL batch file).

    Example:
        >>> from reflectune_hf.oracles.structured import ScoreLine, shape_from_dict
        >>> shape_from_dict(ScoreLine(200).to_dict()) == ScoreLine(200)
        True
    """
    if isinstance(data, tuple(SHAPES.values())):
        return data
    if not isinstance(data, Mapping) or data.get("kind") not in SHAPES:
        raise ValueError(f"answer_format must be one of {sorted(SHAPES)} (a shape or its to_dict()), got {data!r:.120}")
    values = {k: v for k, v in data.items() if k != "kind"}
    if data["kind"] == "marked_fields":
        values["fields"] = tuple(Field(**f) for f in values.get("fields", ()))
    return SHAPES[data["kind"]](**values)


def is_answer_format(value: Any) -> bool:
    """True for a shape object (`MarkedFields`, `ScoreLine`, `RankingAnswer`)."""
    return isinstance(value, tuple(SHAPES.values()))

