"""Evaluation: answer test sets with two models, judge the answers pairwise in both orders, and
report (REFERENCE.md §11).

Two map stages, any oracle (anything with `complete(list[ChatRequest]) -> list[ChatResult]`):

- `GenerateResponses(oracle, column="response")`: answers each row's `instruction` (and `input`).
- `PairwiseJudge(oracle)`: the judge prompt of §11 on `response_a` / `response_b`, A first then
  B first, giving `scores_ab`, `scores_ba` and a `verdict` in {win, tie, lose, error}.

Then `judge_summary` (wins, ties, losses, errors, win score) and `plot_judge` (the papers'
stacked bar chart); `load_eval_set` reads the five public test sets, `quality_report` gives the
data-quality statistics of a training set. The whole `reflectune eval` job is
`eval_run.run_eval` (`scripts/evaluate.py`).

Example:
    >>> from datasets import Dataset
    >>> from reflectune_hf.oracles import ChatResult
    >>> class Judge:  # any object with `complete` is an oracle
    ...     def complete(self, requests):
    ...         return [ChatResult(texts=["8 6\\nThe first answer is better."]) for _ in requests]
    >>> ds = Dataset.from_dict({"instruction": ["Name a colour."], "response_a": ["Blue."],
    ...                         "response_b": ["Hmm."]})
    >>> row = ds.map(PairwiseJudge(Judge()), batched=True)[0]
    >>> row["scores_ab"], row["scores_ba"], row["verdict"]   # the first answer always wins: a tie
    ([8.0, 6.0], [8.0, 6.0], 'tie')
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import ClassVar, Optional

from ..data import batch_size_of, read_records, require_columns, text_column
from ..oracles.backends import structured_mode
from ..oracles.base import ChatRequest
from ..oracles.stage import OracleCaller
from ..oracles.stage_formats import CUT_REASONS, stage_answer_format
from ..prompts import join_input, judge_messages
from .judge import VERDICTS, judge_summary, judge_verdict, parse_judge_scores, plot_judge
from .quality import quality_report

logger = logging.getLogger(__name__)

__all__ = ["GenerateResponses", "PairwiseJudge", "VERDICTS", "judge_summary", "judge_verdict",
           "load_eval_set", "parse_judge_scores", "plot_judge", "quality_report"]

NAN_PAIR = [math.nan, math.nan]


def _inputs(batch, stage: str) -> list[str]:
    return text_column(batch, "input", stage) if "input" in batch else [""] * batch_size_of(batch)


class GenerateResponses(OracleCaller):
    """Map stage: answer each row's question with an oracle (`ds.map(stage, batched=True)`).

    The oracle applies the answering model's chat template: an OpenAI-compatible server applies
    its own, `TransformersOracle` the tokenizer's, so a trained model answers in the format it
    was trained on.

    Input columns: `instruction` (str), `input` (str, optional: appended after a blank line).
    Output columns (`column` is the name given):
        `{column}` (str): the answer, `""` when there is none;
        `{column}_status` (str): `ok`, `truncated` (stopped by `max_tokens` or a content filter),
        `empty` (blank answer), `oracle_error`, or `empty_instruction` (nothing was sent);
        `{column}_error` (str): the oracle's error message, `""` when none.
    Every row and every other column is kept.

    Args:
        oracle: anything with `complete(list[ChatRequest]) -> list[ChatResult]`.
        column: the output column (e.g. `"response_a"` to feed `PairwiseJudge`).
        max_tokens, temperature, top_p, seed: sampling settings of every request.
        system_prompt: an optional system message before each question.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles import ChatResult
        >>> class Echo:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=[r.message_dicts[-1]["content"].upper()]) for r in requests]
        >>> ds = Dataset.from_dict({"instruction": ["say hi", ""], "input": ["", ""]})
        >>> out = ds.map(GenerateResponses(Echo()), batched=True)
        >>> list(out["response"]), list(out["response_status"])
        (['SAY HI', ''], ['ok', 'empty_instruction'])
    """

    stage_name: ClassVar[str] = "GenerateResponses"

    def __init__(self, oracle, column: str = "response", max_tokens: Optional[int] = 512, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, system_prompt: Optional[str] = None):
        self.oracle = oracle
        self._check_oracle()
        if not column:
            raise ValueError(f"{self.stage_name}: column must be a non-empty name")
        self.column = column
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.system_prompt = system_prompt
        self.usage = {}

    def request(self, instruction: str, input: str = "") -> ChatRequest:
        """The chat request answering one question."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": join_input(instruction, input)})
        return ChatRequest(messages=messages, temperature=self.temperature, top_p=self.top_p,
                           max_tokens=self.max_tokens, seed=self.seed)

    def __call__(self, batch) -> dict:
        instructions = text_column(batch, "instruction", self.stage_name)
        inputs = _inputs(batch, self.stage_name)
        n = len(instructions)
        texts, statuses, errors = [""] * n, ["empty_instruction"] * n, [""] * n
        todo = [i for i in range(n) if instructions[i].strip()]
        results = self._complete([self.request(instructions[i], inputs[i]) for i in todo])
        for i, result in zip(todo, results):
            if not result.ok:
                statuses[i], errors[i] = "oracle_error", str(result.error)
            elif not result.text.strip():
                statuses[i] = "empty"
            else:
                texts[i] = result.text
                reason = result.finish_reasons[0] if result.finish_reasons else None
                statuses[i] = "truncated" if reason in CUT_REASONS else "ok"  # token limit, content filter
        return {self.column: texts, f"{self.column}_status": statuses, f"{self.column}_error": errors}


class PairwiseJudge(OracleCaller):
    """Map stage: the pairwise judge in both orders (`ds.map(stage, batched=True)`).

    For each row it sends the judge prompt of REFERENCE.md §11 twice: A's answer as Assistant 1
    (`ab`), then B's answer as Assistant 1 (`ba`), parses the two score lines with
    `parse_judge_scores` and applies `judge_verdict`.

    Input columns: `instruction` (str), `input` (str, optional), `response_a`, `response_b` (str;
    names set by `columns`).
    Output columns:
        `scores_ab` (list of 2 floats): (A, B) as the judge scored them with A first;
        `scores_ba` (list of 2 floats): (B, A) as scored with B first; `[nan, nan]` when absent;
        `verdict` (str): `win`, `tie` or `lose` for A against B, `error` when not judged;
        `judge_status` (str): `ok`, `unparseable` (a score line could not be read),
        `oracle_error`, `missing_response` (an empty answer) or `empty_instruction` (a blank
        question: nothing to judge the answers against); nothing was sent for the last two;
        `judge_ab`, `judge_ba` (str): the judge's raw answers (`""` when none);
        `judge_error` (str): what went wrong, per order (`""` when nothing did).

    Args:
        oracle: the judge (anything with `complete`).
        max_tokens, temperature: the reference's settings are 1024 and 0.
        columns: the names of the A and B answer columns.
        structured: `"auto"` (default) / `"on"` state the score-line shape (`ScoreLine`: two
            scores, then the explanation) for the oracle to enforce where it can; `"off"` plain.
    """

    stage_name: ClassVar[str] = "PairwiseJudge"

    def __init__(self, oracle, max_tokens: Optional[int] = 1024, temperature: float = 0.0,
                 columns: tuple[str, str] = ("response_a", "response_b"), structured="auto"):
        self.oracle = oracle
        self._check_oracle()
        self.structured = structured_mode(structured)
        self.max_tokens = max_tokens
        self.temperature = float(temperature)
        self.columns = tuple(columns)
        self.usage = {}

    def request(self, question: str, answer_1: str, answer_2: str) -> ChatRequest:
        """The judge request for one order of the two answers."""
        shape = stage_answer_format("judge", self.max_tokens) if self.structured != "off" else None
        return ChatRequest(messages=judge_messages(question, answer_1, answer_2), temperature=self.temperature,
                           max_tokens=self.max_tokens, answer_format=shape)

    def __call__(self, batch) -> dict:
        require_columns(batch, ["instruction", *self.columns], self.stage_name)
        questions = [join_input(q, i) for q, i in zip(text_column(batch, "instruction", self.stage_name),
                                                          _inputs(batch, self.stage_name))]
        answers_a, answers_b = (text_column(batch, c, self.stage_name) for c in self.columns)
        n = len(questions)
        out = {"scores_ab": [NAN_PAIR] * n, "scores_ba": [NAN_PAIR] * n, "verdict": ["error"] * n,
               "judge_status": ["missing_response"] * n, "judge_ab": [""] * n, "judge_ba": [""] * n,
               "judge_error": [""] * n}
        todo = [i for i in range(n) if answers_a[i].strip() and answers_b[i].strip() and questions[i].strip()]
        for i in set(range(n)) - set(todo):
            empty = [c for c, a in zip(self.columns, (answers_a[i], answers_b[i])) if not a.strip()]
            problems = [f"empty answer in {', '.join(empty)}"] if empty else []
            if not questions[i].strip():  # response files can carry such rows: a judge would score blind
                out["judge_status"][i] = "empty_instruction"
                problems.insert(0, "empty instruction")
            out["judge_error"][i] = "; ".join(problems)
        requests = []
        for i in todo:
            requests += [self.request(questions[i], answers_a[i], answers_b[i]),
                         self.request(questions[i], answers_b[i], answers_a[i])]
        results = self._complete(requests)
        for k, i in enumerate(todo):
            problems, status, scores = [], "ok", {}
            for order, result in zip(("ab", "ba"), results[2 * k:2 * k + 2]):
                out[f"judge_{order}"][i] = result.text
                if not result.ok:
                    status = "oracle_error"
                    problems.append(f"{order}: oracle error: {result.error}")
                    continue
                scores[order] = parse_judge_scores(result.text)
                if scores[order] is None:
                    status = "oracle_error" if status == "oracle_error" else "unparseable"
                    problems.append(f"{order}: no score line in {result.text[:80]!r}")
                else:
                    out[f"scores_{order}"][i] = list(scores[order])
            out["judge_status"][i] = status
            out["judge_error"][i] = "; ".join(problems)
            if status == "ok":
                out["verdict"][i] = judge_verdict(scores["ab"], scores["ba"])
        return out


# --------------------------------------------------------------------------- test sets

# format: (the column that marks it, the question column, the id column), in detection order: an
# `instruction` column wins (Alpaca rows often carry `text` or `prompt`: the whole prompt, answer included)
EVAL_FORMATS = {
    "sinstruct": ("instances", "instruction", "id"),
    "alpaca": ("instruction", "instruction", "id"),
    "lima": ("conversations", "conversations", None),
    "wizardlm": ("Instruction", "Instruction", "idx"),
    "koala": ("prompt", "prompt", "id"),
    "vicuna": ("text", "text", "question_id"),
}
EVAL_DIR_ENV = "REFLECTUNE_HF_EVAL_DIR"


def _detect_format(rows: list[dict], path: Path) -> str:
    keys = rows[0].keys()
    for name, (marker, _, _) in EVAL_FORMATS.items():
        if marker in keys:
            return name
    known = ", ".join(f"{n} ({m})" for n, (m, _, _) in EVAL_FORMATS.items())
    raise ValueError(f"Cannot tell the test-set format of {path}: its first row has the keys {sorted(keys)}; "
                     f"known formats (marking key): {known}. Pass format=... to choose one.")


def _question(row: dict, fmt: str, index: int, path: Path) -> tuple[str, str]:
    _, column, _ = EVAL_FORMATS[fmt]
    if column not in row:
        raise ValueError(f"{path}: row {index} has no {column!r} key (format {fmt!r}); its keys are {sorted(row)}")
    value, extra = row[column], ""
    if fmt == "lima" and isinstance(value, list):  # the original LIMA: a list of turns, the first is the question
        value = value[0] if value else ""
    if fmt == "sinstruct":
        instances = row.get("instances") or [{}]
        if not isinstance(instances, list) or not isinstance(instances[0], dict):
            raise ValueError(f"{path}: row {index}: 'instances' must be a list of objects (the first one's 'input' "
                             f"is the question's input), got {instances!r:.60}")
        extra = instances[0].get("input") or ""
    elif fmt == "alpaca":
        extra = row.get("input") or ""
    if not isinstance(value, str) or not isinstance(extra, str):
        raise ValueError(f"{path}: row {index}: the question must be a string, got {type(value).__name__}")
    return value, extra


def resolve_eval_path(path_or_name, eval_dir=None) -> Path:
    """A test-set file from a path, or from a name (`"vicuna"`) looked up as `<name>_test_set.jsonl`
    (or `<name>.jsonl`) in `eval_dir` or `$REFLECTUNE_HF_EVAL_DIR`."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    folder = eval_dir or os.environ.get(EVAL_DIR_ENV)
    if folder and path.name == str(path_or_name):
        for candidate in (Path(folder) / f"{path_or_name}_test_set.jsonl", Path(folder) / f"{path_or_name}.jsonl"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"No test set at {path_or_name!r}{f' (nor in {folder})' if folder else ''}. The test sets are not bundled: "
        f"pass the path of a .jsonl/.json file, or a name with eval_dir=... or ${EVAL_DIR_ENV}.")


def load_eval_set(path_or_name, format: Optional[str] = None, eval_dir=None, max_rows: Optional[int] = None):
    """Read a public instruction test set into `instruction` / `input` rows.

    Formats (detected from the first row's keys, or named with `format`): `vicuna` (`text`),
    `wizardlm` (`Instruction`), `koala` (`prompt`), `sinstruct` (Self-Instruct: `instruction`
    and the first of `instances` gives `input`), `lima` (`conversations`: a string, or a list
    whose first turn is the question) and plain `alpaca` (`instruction`, `input`). A row with an
    `instruction` is Self-Instruct or Alpaca whatever else it holds (Alpaca's `text` is the whole
    prompt, answer included). `max_rows` keeps the first N rows (None: all; below 1 is a `ValueError`).

    Returns:
        A Dataset with `id` (int, the row number), `instruction`, `input` (str), `test_set` (the
        file's name without `_test_set`) and `source_id` (the file's own id, as a string).

    Example:
        >>> import json, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "mine_test_set.jsonl")
        >>> _ = open(path, "w").write(json.dumps({"idx": 7, "Instruction": "Add 2 and 3."}) + "\\n")
        >>> load_eval_set(path)[0]
        {'id': 0, 'instruction': 'Add 2 and 3.', 'input': '', 'test_set': 'mine', 'source_id': '7'}
    """
    from datasets import Dataset

    if max_rows is not None and max_rows < 1:
        raise ValueError(f"load_eval_set: max_rows must be >= 1, or None for all rows; got {max_rows!r}")
    path = resolve_eval_path(path_or_name, eval_dir)
    rows = read_records(path)
    if format is not None and format not in EVAL_FORMATS:
        raise ValueError(f"Unknown test-set format {format!r}; choose one of {sorted(EVAL_FORMATS)}")
    fmt = format or _detect_format(rows, path)
    rows = rows[:max_rows] if max_rows is not None else rows
    name = path.stem.removesuffix("_test_set")
    id_key = EVAL_FORMATS[fmt][2]
    records = []
    for i, row in enumerate(rows):
        instruction, extra = _question(row, fmt, i, path)
        source_id = row.get(id_key, i) if id_key else i
        records.append({"id": i, "instruction": instruction, "input": extra, "test_set": name,
                        "source_id": str(source_id)})
    logger.info("load_eval_set: %d rows of %s (format %s)", len(records), path, fmt)
    return Dataset.from_list(records)

