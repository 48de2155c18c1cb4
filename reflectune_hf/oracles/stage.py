"""`OracleCaller`, the base of every stage that calls an oracle (reflection, Tuna, evaluation):
the oracle check, the request/complete loop with its length check and token usage, the re-ask
loop (`ask`) and the `id` handling; and `OracleStage`, the shared configuration of the stages in
`reflectune_hf.reflection.stages` (their module docstring describes the re-asks and statuses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

from ..data import ID_COLUMN, ColumnError, batch_size_of, require_columns, text_column
from ..prompts import PromptSet, get_prompt_set
from ..utils import LazyState
from .backends import structured_mode
from .base import ChatRequest, ChatResult, usage_add
from .stage_formats import CUT_REASONS, fields_at_bound, stage_answer_format

logger = logging.getLogger("reflectune_hf.reflection.stages")

_REFLECTION_FEATURES = {"reflection_raw": "string", "reflection_error": "string", "reflection_attempts": "int64",
                        "reflection_finish_reason": "string"}


class NoOracle:
    """An oracle that sends nothing and fails every request: for building a stage's requests
    (`stage.requests(batch)`) or its output schema without an oracle.

    Example:
        >>> from reflectune_hf.reflection.stages import NoOracle, ReflectResponse
        >>> ReflectResponse(NoOracle()).requests({"instruction": ["Hi"], "output": ["Hello"]})[0].max_tokens
        2048
    """

    def complete(self, requests):
        return [ChatResult.failure("NoOracle sends nothing") for _ in requests]


@dataclass
class _Answer:
    text: str = ""
    error: str = ""
    attempts: int = 0
    finish_reason: str = ""
    rank: int = 1 << 30


class OracleCaller(LazyState):
    """The base of every stage that calls an oracle (`oracle` with `complete(list[ChatRequest]) ->
    list[ChatResult]`): one request/complete loop with a length check, token usage (`usage`, not
    pickled; cached answers cost nothing), the re-ask loop `ask`, and the `id` column.

    Subclasses set `stage_name` (named in errors and logs) and, to re-ask, `temperature`, `seed`,
    `retry_temperature` and `format_retries`.
    """

    _transient: ClassVar[tuple[str, ...]] = ("usage",)
    stage_name: ClassVar[str] = "OracleCaller"
    worst_rank: ClassVar[int] = 1  # the rank of an answer cut by the token limit (0: never re-asked for it)

    def _check_oracle(self) -> None:
        if not callable(getattr(self.oracle, "complete", None)):
            raise TypeError(
                f"{self.stage_name} needs an oracle with complete(list[ChatRequest]) -> list[ChatResult], "
                f"got {type(self.oracle).__name__}"
            )

    def _complete(self, requests: list[ChatRequest]) -> list:
        results = list(self.oracle.complete(requests)) if requests else []
        if len(results) != len(requests):
            raise RuntimeError(f"{self.stage_name}: {type(self.oracle).__name__}.complete returned {len(results)} "
                               f"results for {len(requests)} requests")
        if getattr(self, "usage", None) is None:  # unpickled in a worker
            self.usage = {}
        for result in results:
            if not result.cached:
                usage_add(self.usage, result.usage)
        return results

    def _ids(self, batch: Mapping, indices: Optional[Sequence[int]], required: bool = False) -> dict:
        """`{"id": indices}` when the batch has no ids and `map(..., with_indices=True)`, else `{}`;
        `required` stages (their rows are joined by id later) refuse a batch without either, and
        every stage refuses one example (a map without `batched=True`: `batch_size_of`)."""
        batch_size_of(batch)
        if ID_COLUMN in batch:
            return {}
        if indices is not None:
            return {ID_COLUMN: list(indices)}
        if required:
            raise ColumnError(f"{self.stage_name} needs an {ID_COLUMN!r} column; the data has {list(batch)}. Add "
                              "one with reflectune_hf.add_ids(ds) (or map with with_indices=True).")
        return {}

    def _as_floats(self, *names: str) -> None:
        """Whole-number sampling parameters as floats (`temperature=0` is 0.0): one fingerprint."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))

    def sampling(self, attempt: int) -> tuple:
        """`(temperature, seed)` of an attempt: as configured first, then distinct re-asks (the
        cache cannot return the same answer): seed + attempt, at least `retry_temperature`."""
        if not attempt:
            return self.temperature, self.seed
        return max(self.temperature, self.retry_temperature), (self.seed or 0) + attempt

    def ask(self, conversations: Sequence[list[dict]], rank: Union[Callable[[str], int], Sequence[Callable]],
            request: Optional[Callable[[int, int, bool], ChatRequest]] = None) -> list[_Answer]:
        """Ask the oracle once per conversation, re-asking those whose answer ranks above 0.

        `rank(text)` scores an answer (0: usable), one function for all or one per conversation;
        an answer cut by the token limit or a content filter (`CUT_REASONS`) scores `worst_rank` at
        best, so it is re-asked and any better-parsing answer replaces it. `request(i, attempt,
        longer)` builds the request of conversation `i` (default: `self.request(messages,
        attempt, longer)`). A failed request, first or re-ask, is recorded in `error` and not
        re-asked (the oracle already retried transport errors): that conversation has no usable
        answer, so its row gets `oracle_error` and a rerun asks again (the answers that came are
        in the oracle's cache)."""
        rankers = list(rank) if isinstance(rank, (list, tuple)) else [rank] * len(conversations)
        if request is None:
            request = lambda i, attempt, longer: self.request(conversations[i], attempt, longer)  # noqa: E731
        answers = [_Answer() for _ in conversations]
        pending = list(range(len(conversations)))
        for attempt in range(1 + self.format_retries):
            if not pending:
                break
            requests = [request(i, attempt, answers[i].finish_reason == "length") for i in pending]
            results = self._complete(requests)
            retry, cut = [], 0
            for i, sent, result in zip(pending, requests, results):
                answer = answers[i]
                answer.attempts = attempt + 1
                if not result.ok:  # a re-ask that fails leaves no usable answer either: never a frozen `failed`
                    answer.error = result.error or "the oracle failed without a message"
                    continue
                reasons = result.finish_reasons
                reason = str(reasons[0]) if reasons and reasons[0] else ""
                if reason != "length" and fields_at_bound(getattr(sent, "answer_format", None), result.text):
                    reason = "length"  # the format's length bound ended a field, not the model
                score = rankers[i](result.text)
                if reason in CUT_REASONS:  # stopped before its end (token limit, content filter)
                    score = max(score, self.worst_rank)
                if score < answer.rank:
                    answer.text, answer.rank, answer.finish_reason = result.text, score, reason
                if answer.rank > 0:
                    retry.append(i)
                    cut += answer.finish_reason == "length"
            if retry and attempt < self.format_retries:
                logger.info("%s: re-asking %d of %d answers (%d cut by a length limit or a field's bound, "
                            "with twice the budget; %d that do not parse or a content filter stopped)",
                            self.stage_name, len(retry), len(pending), cut, len(retry) - cut)
            pending = retry
        return answers


@dataclass
class OracleStage(OracleCaller):
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

    stage_name: ClassVar[str] = "OracleStage"
    answer_shape: ClassVar[str] = ""  # the stage's shape in `stage_answer_format`
    # The column that is non-empty exactly for the rows whose request failed (what `map_stage` heals).
    error_column: ClassVar[str] = "reflection_error"
    # The columns the stage writes and their types (the schema of a 0-row result).
    output_features: ClassVar[dict] = _REFLECTION_FEATURES
    worst_rank: ClassVar[int] = 1  # the rank of an answer that does not parse

    def __post_init__(self):
        if isinstance(self.prompt_set, str):
            self.prompt_set = get_prompt_set(self.prompt_set)
        elif not isinstance(self.prompt_set, PromptSet):
            raise TypeError(f"prompt_set must be a name or a PromptSet, got {type(self.prompt_set).__name__}")
        self._check_oracle()
        self._as_floats("temperature", "top_p", "retry_temperature")
        if self.format_retries < 0:
            raise ValueError(f"format_retries must be >= 0, got {self.format_retries}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        self.structured = structured_mode(self.structured)
        if self.structured == "on" and getattr(self.oracle, "structured", None) == "off":
            raise ValueError(f"{self.stage_name}: structured='on' but the oracle has structured='off'")

    # -- the oracle loop -----------------------------------------------------------------------

    def request(self, messages: list[dict], attempt: int = 0, longer: bool = False) -> ChatRequest:
        """The request of one attempt: attempt 0 as configured, re-asks distinct (module docstring);
        `longer` (the re-ask of an answer cut by the token limit) doubles `max_tokens` (the oracle
        still caps it to what the context window leaves)."""
        temperature, seed = self.sampling(attempt)
        max_tokens = self.max_tokens * 2 if longer and self.max_tokens else self.max_tokens
        on = self.structured != "off" and self.answer_shape
        shape = stage_answer_format(self.answer_shape, max_tokens) if on else None
        return ChatRequest(messages=messages, temperature=temperature, top_p=self.top_p, max_tokens=max_tokens,
                           seed=seed, answer_format=shape)

    # -- rows and requests -----------------------------------------------------------------------

    def _pair_columns(self, batch: Mapping, indices: Optional[Sequence[int]]) -> tuple:
        """(output dict with ids if needed, n, instructions, outputs, inputs) of a pair batch."""
        require_columns(batch, ["instruction", "output"], self.stage_name)
        out = self._ids(batch, indices)
        n = batch_size_of(batch)
        inputs = text_column(batch, "input", self.stage_name) if "input" in batch else [""] * n
        return (out, n, text_column(batch, "instruction", self.stage_name),
                text_column(batch, "output", self.stage_name), inputs)

    def _plan(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> tuple:
        """`(out, n, todo, conversations, context)`: the columns written whatever the oracle says,
        the positions of the rows to send, their conversations, and what `__call__` needs."""
        raise NotImplementedError

    def requests(self, batch: Mapping) -> list[ChatRequest]:
        """The first-attempt requests this stage sends for `batch` (rows that get no request
        left out), exactly as `__call__` sends them: what `reflectune estimate` counts.

        Example:
            >>> from reflectune_hf.reflection.stages import NoOracle, ReflectResponse
            >>> batch = {"instruction": [" Name a bird. ", ""], "output": ["Cat.", "x"]}
            >>> requests = ReflectResponse(NoOracle()).requests(batch)  # the empty instruction sends nothing
            >>> len(requests), "[Instruction]\\nName a bird.\\n" in requests[0].message_dicts[1]["content"]
            (1, True)
        """
        _, _, _, conversations, _ = self._plan(batch)
        return [self.request(messages) for messages in conversations]

    def failed_rows(self, dataset) -> list[int]:
        """Positions of the rows of a mapped `dataset` whose request failed (`error_column` set)."""
        if self.error_column not in dataset.column_names:
            return []
        return [i for i, error in enumerate(dataset[self.error_column]) if error]

    @staticmethod
    def _reflection_columns(answers: list[_Answer], todo: Sequence[int], n: int) -> dict:
        """The reflection columns of `n` rows, answered at positions `todo`; the other rows (no
        request) get `""` / 0 attempts."""
        columns = {"reflection_raw": [""] * n, "reflection_error": [""] * n, "reflection_attempts": [0] * n,
                   "reflection_finish_reason": [""] * n}
        for i, a in zip(todo, answers):
            columns["reflection_raw"][i], columns["reflection_error"][i] = a.text, a.error
            columns["reflection_attempts"][i], columns["reflection_finish_reason"][i] = a.attempts, a.finish_reason
        return columns
