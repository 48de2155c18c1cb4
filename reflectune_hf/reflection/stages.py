"""The oracle stages of Reflection-Tuning, as callables for `Dataset.map(stage, batched=True)`.

- `CompressInstruction`: fold a non-empty `input` into the instruction (REFERENCE.md §2).
- `ReflectInstruction`: the oracle criticises the pair and writes a new instruction and answer
  (§3); `extract_instruction_reflection` then pulls them out of `reflection_raw`.
- `ReflectResponse`: the oracle writes a better answer (§4), with the with-input prompt for rows
  that have an input; then `extract_response_reflection`.

Run a stage with `map_stage(ds, stage)` (`reflectune_hf.oracles.rerun.map_stage`, also importable from
here and from `reflectune_hf`): it is `ds.map(stage, batched=True)`, except that a result the
datasets cache replays with failed rows (`oracle_error`) is computed again, so a rerun re-sends
exactly the requests that failed (the answered ones come from the oracle cache), and a 0-row
dataset gets the stage's output columns.

Rows that cannot be sent get no request, keep their values and say why (`row_checks`):
`empty_input` (an empty, None or blank instruction or output; for compression, a blank
instruction with an input) and `invalid_text` (text that is not valid UTF-8, e.g. a lone
surrogate). An answer cut by the token limit (`finish_reason == "length"`, re-asked with twice
the `max_tokens`) or by a content filter (`"content_filter"`, re-asked) counts as unparsed and,
when kept, gives the status `truncated` with the previous text as fallback.

The `id` column is optional: the stages keep every row in order; with
`map(..., with_indices=True)` and no `id` column, they add `id` from the indices.

Each stage takes any oracle (an object with `complete(list[ChatRequest]) -> list[ChatResult]`),
sends one `complete()` call per map batch (the oracle parallelises and caches per request)
plus at most `format_retries` re-ask calls, keeps every row and every column it does not write,
and records oracle failures per row. A stage pickles to its configuration only (oracle
configuration, prompt set, sampling parameters; runtime usage counters are left out), so
`datasets` gives it the same fingerprint in every process and serves a repeated `map` on an
Arrow-backed dataset from its cache without calling the oracle.

Format re-ask (`format_retries`, default 1, as the reference): when an answer cannot be parsed
into the requested format (for instruction reflection: when the new instruction or the new
answer is missing; the reference re-asks only when both are), the same prompt is sent again as a *distinct* request: `seed` is the
attempt number (plus `seed` when set) and the temperature is raised to at least
`retry_temperature` (0.7). The distinct seed gives the re-ask its own cache key, so the per-request
oracle cache cannot hand back the same unparsable text, and the higher temperature makes it a real
second sample even on a greedy, deterministic server (where a seed alone changes nothing). The
better-parsing answer of the attempts is kept (the first one on a tie). A re-ask that fails
(the oracle's retries spent) keeps the first answer in `reflection_raw` and sets
`reflection_error`: the row is `oracle_error`, still owed its re-ask, and a rerun sends it.

Example:
    >>> from reflectune_hf.oracles.base import ChatResult
    >>> from reflectune_hf.reflection.stages import ReflectResponse
    >>> class Canned:  # any object with complete() is an oracle
    ...     def complete(self, requests):
    ...         return [ChatResult(texts=["[Better Answer] Paris is the capital of France. [End]"]) for _ in requests]
    >>> stage = ReflectResponse(Canned())
    >>> stage({"id": [0], "instruction": ["Capital of France?"], "output": ["paris"]})["reflection_raw"]
    ['[Better Answer] Paris is the capital of France. [End]']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional, Sequence

from ..data import ID_COLUMN, ColumnError, batch_size_of, require_columns, text_column
from ..oracles.rerun import map_stage  # noqa: F401  (the one obvious call, documented here)
from ..oracles.stage import NoOracle, OracleStage  # noqa: F401  (public here too)
from ..oracles.stage_formats import CUT_REASONS
from ..prompts import merge_input  # noqa: F401  (public here too)
from .extract import instruction_status, parse_compressed_instruction, parse_instruction_reflection
from .extract import parse_response_reflection
from .row_checks import input_survives, is_valid_text, skip_reason

logger = logging.getLogger(__name__)

COMPRESS_STATUSES = ("ok", "no_input", "fallback_merged", "input_lost", "truncated", "empty_input", "invalid_text",
                     "oracle_error")
_INSTRUCTION_RANK = {"ok": 0, "instruction_fallback": 1, "output_fallback": 1, "failed": 2}


@dataclass
class CompressInstruction(OracleStage):
    """Fold a non-empty `input` into one self-contained instruction (REFERENCE.md §2).

    Rows with a non-empty `input` get the oracle's instruction and `input=""`; rows without input
    pass through without an oracle call. Nothing is lost: when the oracle fails, its answer does
    not parse (after `format_retries` re-asks), is cut by the token limit, or drops the input
    (`row_checks.input_survives`), the instruction becomes the deterministic merge
    `merge_input(instruction, input)`, and the original values are kept in `original_instruction`
    and `original_input` (left as they are when those columns exist already).

    Run it with `map_stage(ds, CompressInstruction(oracle))`: a rerun then re-sends the requests
    that failed (plain `ds.map(stage, batched=True)` replays them from the datasets cache).

    Input columns: `instruction`, `input` (str); `id` optional.
    Output columns: `instruction`, `input` (always `""`), `compress_status` in
    `COMPRESS_STATUSES`: `ok`, `no_input` (blank input: no request), `fallback_merged` (the answer
    does not parse), `input_lost` (the answer drops the input), `truncated` (the answer hit the
    token limit or a content filter), `empty_input` (blank instruction with an input: no request), `invalid_text`
    (not valid UTF-8: no request), `oracle_error`; `compress_raw` (the oracle's text, `""`
    without a call), `compress_error` (`""` unless the oracle failed), `original_instruction`,
    `original_input`. Every other column (`output`, `id`, ...) is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflection.stages import CompressInstruction, map_stage
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["[New Instruction] Translate 'Good morning' to French. [End]"])
        ...                 for _ in requests]
        >>> ds = Dataset.from_dict({"instruction": ["Translate to French.", "Say hi."],
        ...                         "input": ["Good morning", ""], "output": ["Bonjour", "Hi"]})
        >>> out = map_stage(ds, CompressInstruction(Canned()))
        >>> list(out["instruction"]), list(out["compress_status"])
        (["Translate 'Good morning' to French.", 'Say hi.'], ['ok', 'no_input'])
    """

    stage_name: ClassVar[str] = "CompressInstruction"
    answer_shape: ClassVar[str] = "compress"
    error_column: ClassVar[str] = "compress_error"
    output_features: ClassVar[dict] = {name: "string" for name in (
        "instruction", "input", "compress_status", "compress_raw", "compress_error", "original_instruction",
        "original_input")}

    def _plan(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> tuple:
        require_columns(batch, ["instruction", "input"], self.stage_name)
        out = self._ids(batch, indices)
        n = batch_size_of(batch)
        instructions = text_column(batch, "instruction", self.stage_name)
        inputs = text_column(batch, "input", self.stage_name)
        statuses = []
        for ins, inp in zip(instructions, inputs):
            if not (is_valid_text(ins) and is_valid_text(inp)):
                statuses.append("invalid_text")
            elif not inp.strip():
                statuses.append("no_input")
            else:
                statuses.append("empty_input" if not ins.strip() else "")
        todo = [i for i in range(n) if not statuses[i]]
        conversations = [self.prompt_set.compress_messages(instructions[i].strip(), inputs[i].strip()) for i in todo]
        return out, n, todo, conversations, (instructions, inputs, statuses)

    def _compressed(self, text: str, input: str) -> Optional[str]:
        compressed = parse_compressed_instruction(text)
        return compressed if compressed and input_survives(input, compressed) else None

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out, n, todo, conversations, (instructions, inputs, statuses) = self._plan(batch, indices)
        rankers = [lambda text, inp=inputs[i]: 0 if self._compressed(text, inp) else 1 for i in todo]
        answers = self.ask(conversations, rankers)

        new_instructions = [ins if status == "no_input" else merge_input(ins, inp)
                            for ins, inp, status in zip(instructions, inputs, statuses)]
        raws, errors = [""] * n, [""] * n
        for i, answer in zip(todo, answers):
            raws[i], errors[i] = answer.text, answer.error
            if answer.error:
                statuses[i] = "oracle_error"
            elif answer.finish_reason in CUT_REASONS:
                statuses[i] = "truncated"
            elif not parse_compressed_instruction(answer.text):
                statuses[i] = "fallback_merged"
            elif self._compressed(answer.text, inputs[i]) is None:
                statuses[i] = "input_lost"
            else:
                statuses[i], new_instructions[i] = "ok", self._compressed(answer.text, inputs[i])
        out.update(
            instruction=new_instructions,
            input=[""] * n,
            compress_status=statuses,
            compress_raw=raws,
            compress_error=errors,
        )
        if "original_instruction" not in batch:
            out["original_instruction"] = instructions
        if "original_input" not in batch:
            out["original_input"] = inputs
        return out


@dataclass
class ReflectInstruction(OracleStage):
    """Instruction reflection (REFERENCE.md §3): the oracle criticises the pair against the
    method's criteria and writes a new instruction and its answer.

    The prompt never shows `input`, so a row with a non-empty `input` raises a `ColumnError`
    telling to run `CompressInstruction` first, unless `merge_input=True`, which folds the input
    into the instruction text (`merge_input(instruction, input)`, written back with `input=""`).
    Follow with `extract_instruction_reflection`. Run it with `map_stage(ds, stage)`: a rerun then
    re-sends the requests that failed.

    Input columns: `instruction`, `output`, optionally `input` (str) and `id`.
    Output columns: `reflection_raw` (the best answer, kept when a re-ask failed; `""` when the
    first request failed or none was sent), `reflection_error` (`""` unless a request failed),
    `reflection_attempts` (oracle answers requested, 1 + re-asks; 0 for a row that gets no
    request: `empty_input`, `invalid_text`), `reflection_finish_reason` (`"stop"`, `"length"`,
    ...); with `merge_input=True` also `instruction` and `input`. Every other column is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflection.stages import ReflectInstruction, map_stage
        >>> from reflectune_hf.reflection.extract import extract_instruction_reflection
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["1. Too vague.\\n2. [New Instruction] Explain photosynthesis "
        ...                  "to a ten-year-old. [End]\\n3. [New Answer] Plants make food from light. [End]"])
        ...                 for _ in requests]
        >>> ds = Dataset.from_dict({"instruction": ["Plants?"], "input": [""], "output": ["Green."]})
        >>> ds = map_stage(ds, ReflectInstruction(Canned())).map(extract_instruction_reflection, batched=True)
        >>> ds[0]["instruction"], ds[0]["output"], ds[0]["reflection_status"]
        ('Explain photosynthesis to a ten-year-old.', 'Plants make food from light.', 'ok')
    """

    merge_input: bool = False
    stage_name: ClassVar[str] = "ReflectInstruction"
    answer_shape: ClassVar[str] = "instruction"
    worst_rank: ClassVar[int] = _INSTRUCTION_RANK["failed"]

    def _plan(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> tuple:
        out, n, instructions, outputs, inputs = self._pair_columns(batch, indices)
        with_input = [i for i in range(n) if inputs[i].strip()]
        if with_input and not self.merge_input:
            ids = list(batch[ID_COLUMN] if ID_COLUMN in batch else range(n) if indices is None else indices)
            raise ColumnError(
                f"{self.stage_name}: {len(with_input)} row(s) of this batch have a non-empty 'input' (first id "
                f"{ids[with_input[0]]!r}); instruction reflection never shows the input to the oracle, so it would "
                f"be lost. Run CompressInstruction first (ds.map(CompressInstruction(oracle), batched=True)) or pass "
                f"merge_input=True to fold the input into the instruction text."
            )
        if self.merge_input:
            instructions = [merge_input(ins, inp) for ins, inp in zip(instructions, inputs)]
            out.update(instruction=instructions)
            if "input" in batch:
                out.update(input=[""] * n)
        todo = [i for i in range(n) if not skip_reason(instructions[i], outputs[i])]
        conversations = [self.prompt_set.instruction_messages(instructions[i].strip(), outputs[i].strip())
                         for i in todo]
        return out, n, todo, conversations, None

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out, n, todo, conversations, _ = self._plan(batch, indices)
        answers = self.ask(conversations, lambda text: _INSTRUCTION_RANK[instruction_status(*parse_instruction_reflection(text))])
        out.update(self._reflection_columns(answers, todo, n))
        return out


@dataclass
class ReflectResponse(OracleStage):
    """Response reflection (REFERENCE.md §4): the oracle criticises the answer and writes a better
    one. Rows with a non-empty `input` get the with-input prompt, the others the plain one.
    Follow with `extract_response_reflection`. Run it with `map_stage(ds, stage)`: a rerun then
    re-sends the requests that failed.

    Input columns: `instruction`, `output`, optionally `input` (str) and `id`.
    Output columns: `reflection_raw`, `reflection_error`, `reflection_attempts`,
    `reflection_finish_reason` (as `ReflectInstruction`). Every other column is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflection.stages import ReflectResponse, map_stage
        >>> from reflectune_hf.reflection.extract import extract_response_reflection
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["1. Too short.\\n2. **[Better Answer]**: 2 + 2 = 4. [End]"]) for _ in requests]
        >>> ds = Dataset.from_dict({"instruction": ["Add the numbers."], "input": ["2, 2"], "output": ["4"]})
        >>> ds = map_stage(ds, ReflectResponse(Canned())).map(extract_response_reflection, batched=True)
        >>> ds[0]["output"], ds[0]["reflection_status"]
        ('2 + 2 = 4.', 'ok')
    """

    stage_name: ClassVar[str] = "ReflectResponse"
    answer_shape: ClassVar[str] = "response"

    def _plan(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> tuple:
        out, n, instructions, outputs, inputs = self._pair_columns(batch, indices)
        todo = [i for i in range(n) if is_valid_text(inputs[i]) and not skip_reason(instructions[i], outputs[i])]
        conversations = [
            self.prompt_set.response_messages(instructions[i].strip(), outputs[i].strip(), input=inputs[i].strip())
            for i in todo
        ]
        return out, n, todo, conversations, None

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out, n, todo, conversations, _ = self._plan(batch, indices)
        answers = self.ask(conversations, lambda text: 0 if parse_response_reflection(text) is not None else 1)
        out.update(self._reflection_columns(answers, todo, n))
        return out
