"""The oracle stages of Reflection-Tuning, as callables for `Dataset.map(stage, batched=True)`.

- `CompressInstruction`: fold a non-empty `input` into the instruction (REFERENCE.md §2).
- `ReflectInstruction`: the oracle criticises the pair and writes a new instruction and answer
  (§3); `extract_instruction_reflection` then pulls them out of `reflection_raw`.
- `ReflectResponse`: the oracle writes a better answer (§4), with the with-input prompt for rows
  that have an input; then `extract_response_reflection`.

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
better-parsing answer of the attempts is kept (the first one on a tie); a failed re-ask never
replaces a usable first answer.

Example:
    >>> from reflectune_hf.oracles.base import ChatResult
    >>> from reflectune_hf.reflect import ReflectResponse
    >>> class Canned:  # any object with complete() is an oracle
    ...     def complete(self, requests):
    ...         return [ChatResult(texts=["[Better Answer] Paris is the capital of France. [End]"]) for _ in requests]
    >>> stage = ReflectResponse(Canned())
    >>> stage({"id": [0], "instruction": ["Capital of France?"], "output": ["paris"]})["reflection_raw"]
    ['[Better Answer] Paris is the capital of France. [End]']
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

from .data import ID_COLUMN, ColumnError, batch_size_of, require_columns, text_column
from .extract import instruction_status, parse_compressed_instruction, parse_instruction_reflection
from .extract import parse_response_reflection
from .oracles.backends import structured_mode
from .oracles.base import ChatRequest, usage_add
from .oracles.stage_formats import stage_answer_format
from .prompts import PromptSet, get_prompt_set
from .utils import LazyState

logger = logging.getLogger(__name__)

COMPRESS_STATUSES = ("ok", "no_input", "fallback_merged", "oracle_error")
_INSTRUCTION_RANK = {"ok": 0, "instruction_fallback": 1, "output_fallback": 1, "failed": 2}


def merge_input(instruction: str, input: str) -> str:
    """The deterministic, lossless merge of an instruction and its input: the instruction, a blank
    line, the input (the instruction alone when the input is blank).

    Example:
        >>> from reflectune_hf.reflect import merge_input
        >>> merge_input("Translate to French.", "Good morning")
        'Translate to French.\\n\\nGood morning'
    """
    if not input.strip():
        return instruction
    if not instruction.strip():
        return input.strip()
    return f"{instruction.rstrip()}\n\n{input.strip()}"


@dataclass
class _Answer:
    text: str = ""
    error: str = ""
    attempts: int = 0
    finish_reason: str = ""
    rank: int = 1 << 30


@dataclass
class OracleStage(LazyState):
    """Shared configuration and oracle loop of the reflection stages.

    Args:
        oracle: any object with `complete(list[ChatRequest]) -> list[ChatResult]`.
        prompt_set: `"paper"` (byte-identical to the method, default), `"clean"` or a `PromptSet`.
        max_tokens: completion budget per request (the reference uses 2048).
        temperature, top_p, seed: sampling parameters of the first request (reference: 0.0, 1.0).
        format_retries: re-asks when the answer does not parse (see the module docstring).
        retry_temperature: the lowest temperature of a re-ask.
        structured: `"auto"` (default) or `"on"`/True: each request states the answer shape
            (`oracles.stage_formats.stage_answer_format`) for the oracle to enforce where its
            backend can (grammar, regex, JSON schema; the prompt is unchanged); `"off"`/False:
            plain requests, as before.
    """

    oracle: Any
    prompt_set: Union[str, PromptSet] = "paper"
    max_tokens: Optional[int] = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    format_retries: int = 1
    retry_temperature: float = 0.7
    structured: Union[str, bool] = "auto"
    usage: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    _transient: ClassVar[tuple[str, ...]] = ("usage",)
    stage_name: ClassVar[str] = "OracleStage"
    answer_shape: ClassVar[str] = ""  # the stage's shape in `stage_answer_format`

    def __post_init__(self):
        if isinstance(self.prompt_set, str):
            self.prompt_set = get_prompt_set(self.prompt_set)
        elif not isinstance(self.prompt_set, PromptSet):
            raise TypeError(f"prompt_set must be a name or a PromptSet, got {type(self.prompt_set).__name__}")
        if not callable(getattr(self.oracle, "complete", None)):
            raise TypeError(
                f"{self.stage_name} needs an oracle with complete(list[ChatRequest]) -> list[ChatResult], "
                f"got {type(self.oracle).__name__}"
            )
        if self.format_retries < 0:
            raise ValueError(f"format_retries must be >= 0, got {self.format_retries}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.structured = structured_mode(self.structured)
        if self.structured == "on" and getattr(self.oracle, "structured", None) == "off":
            raise ValueError(f"{self.stage_name}: structured='on' but the oracle has structured='off'")

    # -- the oracle loop -----------------------------------------------------------------------

    def request(self, messages: list[dict], attempt: int = 0) -> ChatRequest:
        """The request of one attempt: attempt 0 as configured, re-asks distinct (module docstring)."""
        temperature, seed = self.temperature, self.seed
        if attempt:
            temperature, seed = max(self.temperature, self.retry_temperature), (self.seed or 0) + attempt
        on = self.structured != "off" and self.answer_shape
        shape = stage_answer_format(self.answer_shape, self.max_tokens) if on else None
        return ChatRequest(messages=messages, temperature=temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                           seed=seed, answer_format=shape)

    def _complete(self, requests: list[ChatRequest]) -> list:
        results = list(self.oracle.complete(requests))
        if len(results) != len(requests):
            raise RuntimeError(
                f"{type(self.oracle).__name__}.complete returned {len(results)} results for {len(requests)} requests"
            )
        if self.usage is None:
            self.usage = {}
        for result in results:
            if not result.cached:
                usage_add(self.usage, result.usage)
        return results

    def ask(self, conversations: Sequence[list[dict]], rank: Callable[[str], int]) -> list[_Answer]:
        """Ask the oracle once per conversation, re-asking those whose answer ranks above 0."""
        answers = [_Answer() for _ in conversations]
        pending = list(range(len(conversations)))
        for attempt in range(1 + self.format_retries):
            if not pending:
                break
            results = self._complete([self.request(conversations[i], attempt) for i in pending])
            retry = []
            for i, result in zip(pending, results):
                answer = answers[i]
                answer.attempts = attempt + 1
                if not result.ok:
                    if attempt == 0:  # the oracle already retried transport errors: record it
                        answer.error = result.error or "the oracle failed without a message"
                    continue
                score = rank(result.text)
                if score < answer.rank:
                    reasons = result.finish_reasons
                    answer.text, answer.rank = result.text, score
                    answer.finish_reason = str(reasons[0]) if reasons and reasons[0] else ""
                if answer.rank > 0:
                    retry.append(i)
            if retry and attempt < self.format_retries:
                logger.info("%s: re-asking %d of %d answers that do not parse", self.stage_name, len(retry), len(pending))
            pending = retry
        return answers

    # -- columns ---------------------------------------------------------------------------------

    def _ids(self, batch: Mapping, indices: Optional[Sequence[int]]) -> dict:
        """`{}` when the batch has ids; `{"id": indices}` when `map(..., with_indices=True)`."""
        if ID_COLUMN in batch:
            return {}
        if indices is not None:
            return {ID_COLUMN: list(indices)}
        raise ColumnError(
            f"{self.stage_name} needs an {ID_COLUMN!r} column to keep the variants of a row aligned; "
            f"the data has {list(batch)}. Add one with reflectune_hf.add_ids(ds) (or map with with_indices=True)."
        )

    def _pair_columns(self, batch: Mapping, indices: Optional[Sequence[int]]) -> tuple:
        """(output dict with ids if needed, n, instructions, outputs, inputs) of a pair batch."""
        require_columns(batch, ["instruction", "output"], self.stage_name)
        out = self._ids(batch, indices)
        n = batch_size_of(batch)
        inputs = text_column(batch, "input", self.stage_name) if "input" in batch else [""] * n
        return (out, n, text_column(batch, "instruction", self.stage_name),
                text_column(batch, "output", self.stage_name), inputs)

    @staticmethod
    def _reflection_columns(answers: list[_Answer]) -> dict:
        return {
            "reflection_raw": [a.text for a in answers],
            "reflection_error": [a.error for a in answers],
            "reflection_attempts": [a.attempts for a in answers],
            "reflection_finish_reason": [a.finish_reason for a in answers],
        }


@dataclass
class CompressInstruction(OracleStage):
    """Fold a non-empty `input` into one self-contained instruction (REFERENCE.md §2).

    Rows with a non-empty `input` get the oracle's instruction and `input=""`; rows without input
    pass through without an oracle call. Nothing is lost: when the oracle fails or its answer does
    not parse (after `format_retries` re-asks), the instruction becomes the deterministic merge
    `merge_input(instruction, input)`, and the original values are kept in `original_instruction`
    and `original_input` (left as they are when those columns exist already).

    Input columns: `id` (or `map(..., with_indices=True)`), `instruction`, `input` (str).
    Output columns: `instruction`, `input` (always `""`), `compress_status` in {`ok`, `no_input`,
    `fallback_merged`, `oracle_error`}, `compress_raw` (the oracle's text, `""` without a call),
    `compress_error` (`""` unless the oracle failed), `original_instruction`, `original_input`.
    Every other column (`output`, `id`, ...) is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflect import CompressInstruction
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["[New Instruction] Translate 'Good morning' to French. [End]"])
        ...                 for _ in requests]
        >>> ds = Dataset.from_dict({"id": [0, 1], "instruction": ["Translate to French.", "Say hi."],
        ...                         "input": ["Good morning", ""], "output": ["Bonjour", "Hi"]})
        >>> out = ds.map(CompressInstruction(Canned()), batched=True)
        >>> list(out["instruction"]), list(out["compress_status"])
        (["Translate 'Good morning' to French.", 'Say hi.'], ['ok', 'no_input'])
    """

    stage_name: ClassVar[str] = "CompressInstruction"
    answer_shape: ClassVar[str] = "compress"

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        require_columns(batch, ["instruction", "input"], self.stage_name)
        out = self._ids(batch, indices)
        n = batch_size_of(batch)
        instructions = text_column(batch, "instruction", self.stage_name)
        inputs = text_column(batch, "input", self.stage_name)
        todo = [i for i in range(n) if inputs[i].strip()]
        conversations = [self.prompt_set.compress_messages(instructions[i].strip(), inputs[i].strip()) for i in todo]
        answers = self.ask(conversations, lambda text: 0 if parse_compressed_instruction(text) else 1)

        new_instructions, statuses = list(instructions), ["no_input"] * n
        raws, errors = [""] * n, [""] * n
        for i, answer in zip(todo, answers):
            compressed = None if answer.error else parse_compressed_instruction(answer.text)
            new_instructions[i] = compressed or merge_input(instructions[i], inputs[i])
            statuses[i] = "oracle_error" if answer.error else ("ok" if compressed else "fallback_merged")
            raws[i], errors[i] = answer.text, answer.error
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
    Follow with `extract_instruction_reflection`.

    Input columns: `id` (or `map(..., with_indices=True)`), `instruction`, `output`, optionally
    `input` (str).
    Output columns: `reflection_raw` (the oracle's text, `""` when it failed), `reflection_error`
    (`""` unless the oracle failed), `reflection_attempts` (oracle answers requested, 1 + re-asks),
    `reflection_finish_reason` (`"stop"`, `"length"`, ...); with `merge_input=True` also
    `instruction` and `input`. Every other column is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflect import ReflectInstruction
        >>> from reflectune_hf.extract import extract_instruction_reflection
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["1. Too vague.\\n2. [New Instruction] Explain photosynthesis "
        ...                  "to a ten-year-old. [End]\\n3. [New Answer] Plants make food from light. [End]"])
        ...                 for _ in requests]
        >>> ds = Dataset.from_dict({"id": [0], "instruction": ["Plants?"], "input": [""], "output": ["Green."]})
        >>> ds = ds.map(ReflectInstruction(Canned()), batched=True).map(extract_instruction_reflection, batched=True)
        >>> ds[0]["instruction"], ds[0]["output"], ds[0]["reflection_status"]
        ('Explain photosynthesis to a ten-year-old.', 'Plants make food from light.', 'ok')
    """

    merge_input: bool = False
    stage_name: ClassVar[str] = "ReflectInstruction"
    answer_shape: ClassVar[str] = "instruction"

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out, n, instructions, outputs, inputs = self._pair_columns(batch, indices)
        with_input = [i for i in range(n) if inputs[i].strip()]
        if with_input and not self.merge_input:
            ids = batch.get(ID_COLUMN) or indices or list(range(n))
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
        conversations = [self.prompt_set.instruction_messages(ins.strip(), outp.strip())
                         for ins, outp in zip(instructions, outputs)]
        answers = self.ask(conversations, lambda text: _INSTRUCTION_RANK[instruction_status(*parse_instruction_reflection(text))])
        out.update(self._reflection_columns(answers))
        return out


@dataclass
class ReflectResponse(OracleStage):
    """Response reflection (REFERENCE.md §4): the oracle criticises the answer and writes a better
    one. Rows with a non-empty `input` get the with-input prompt, the others the plain one.
    Follow with `extract_response_reflection`.

    Input columns: `id` (or `map(..., with_indices=True)`), `instruction`, `output`, optionally
    `input` (str).
    Output columns: `reflection_raw`, `reflection_error`, `reflection_attempts`,
    `reflection_finish_reason` (as `ReflectInstruction`). Every other column is kept.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflect import ReflectResponse
        >>> from reflectune_hf.extract import extract_response_reflection
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["1. Too short.\\n2. **[Better Answer]**: 2 + 2 = 4. [End]"]) for _ in requests]
        >>> ds = Dataset.from_dict({"id": [0], "instruction": ["Add the numbers."], "input": ["2, 2"], "output": ["4"]})
        >>> ds = ds.map(ReflectResponse(Canned()), batched=True).map(extract_response_reflection, batched=True)
        >>> ds[0]["output"], ds[0]["reflection_status"]
        ('2 + 2 = 4.', 'ok')
    """

    stage_name: ClassVar[str] = "ReflectResponse"
    answer_shape: ClassVar[str] = "response"

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out, n, instructions, outputs, inputs = self._pair_columns(batch, indices)
        conversations = [
            self.prompt_set.response_messages(ins.strip(), outp.strip(), input=inp.strip())
            for ins, outp, inp in zip(instructions, outputs, inputs)
        ]
        answers = self.ask(conversations, lambda text: 0 if parse_response_reflection(text) is not None else 1)
        out.update(self._reflection_columns(answers))
        return out
