"""Tuna (REFERENCE.md §10): ranking data from an oracle, and ranking-loss fine-tuning.

Two ways to rank N responses per instruction, each a `Dataset.map(..., batched=True)` stage
that keeps every row and every column it does not write, and records a status per row:

- Probabilistic ranking: `SampleResponses(teacher)` samples `n` responses with token logprobs
  (`responses`, `avg_logprobs`), then `rank_by_logprob` orders them by mean token log-probability
  (`ranked_responses`, best first).
- Contextual ranking: a judge LLM reads the student's `responses` with Tuna's ranking prompt,
  writes its own reference response (index N, "Response 4") and ranks them all:
  `ContextualRank(judge)` adds `ranking_raw`, `rank`, `reference_response`, `ranking_status` and
  `ranked_responses`.

`TunaTrainer` (import it from `reflectune_hf.tuna.trainer`, which imports this module) trains on
`ranked_responses` with cross-entropy plus the rank-gap margin loss `tuna_loss`.

Example:
    >>> from datasets import Dataset
    >>> from reflectune_hf.tuna.stages import rank_by_logprob
    >>> ds = Dataset.from_dict({"id": [0], "responses": [["ok", "good", "bad"]],
    ...                         "avg_logprobs": [[-1.0, -0.2, -3.0]]})
    >>> ds.map(rank_by_logprob, batched=True)[0]["ranked_responses"]
    ['good', 'ok', 'bad']
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

from ..data import ColumnError, batch_size_of, require_columns, text_column
from ..oracles.backends import structured_mode
from ..oracles.base import ChatRequest
from ..oracles.stage import OracleCaller
from ..oracles.stage_formats import CUT_REASONS, stage_answer_format
from ..prompts import get_scoring_template, join_input, tuna_ranking_messages
from ..reflection.row_checks import SKIP_STATUSES, is_valid_text, skip_reason
from ..utils import versioned
from .parse import ParsedRanking, extract_reference_response, parse_ranking  # noqa: F401 (public here too)

logger = logging.getLogger(__name__)

# SKIP_STATUSES (`empty_input`, `invalid_text`): rows that get no request (`_TunaStage._skips`).
SAMPLE_STATUSES = ("ok", "partial_logprobs", "no_logprobs", "missing_responses", "oracle_error", *SKIP_STATUSES)
RANKING_STATUSES = ("ok", "repaired", "partial", "no_ranking", "no_scores", "no_responses", "oracle_error",
                    *SKIP_STATUSES)
_SKIP_MESSAGES = {"empty_input": "the instruction is empty, None or blank: nothing was sent",
                  "invalid_text": "a text of the row is not valid UTF-8 (a lone surrogate): nothing was sent"}


def format_prompt(instruction: str, input: str = "", template: Optional[str] = "alpaca") -> str:
    """The instruction (and input) as the model sees it: a scoring template by name
    (`"alpaca"`, Tuna's training template, by default) or, with `template=None`, the instruction
    followed by a blank line and the input.

    Example:
        >>> from reflectune_hf.tuna.stages import format_prompt
        >>> format_prompt("Say hi.", template=None)
        'Say hi.'
    """
    if template is None:
        return join_input(instruction, input, skip_blank=True)
    return get_scoring_template(template).format(instruction, input)


def _mean_logprob(tokens) -> float:
    """Mean token log-probability of one choice; NaN when unknown or when it has no tokens."""
    if not tokens:
        return math.nan
    values = [t.get("logprob") if isinstance(t, Mapping) else None for t in tokens]
    if any(not isinstance(v, (int, float)) or math.isnan(v) for v in values):
        return math.nan
    return math.fsum(values) / len(values)


class _TunaStage(OracleCaller):
    """The oracle loop of the Tuna stages (`OracleCaller`) plus their template and prompts."""

    stage_name: ClassVar[str] = "Tuna"

    def _validate(self) -> None:
        """Fail at construction on an object that is no oracle or an unknown template name."""
        self._check_oracle()
        if self.template is not None:
            get_scoring_template(self.template)

    def _texts(self, batch: Mapping) -> tuple[list[str], list[str]]:
        n = batch_size_of(batch)
        instructions = text_column(batch, "instruction", self.stage_name)
        inputs = text_column(batch, "input", self.stage_name) if "input" in batch else [""] * n
        return instructions, inputs

    def _prompts(self, batch: Mapping) -> list[str]:
        return [format_prompt(i, x, self.template) for i, x in zip(*self._texts(batch))]

    def _skips(self, batch: Mapping, others: Optional[list] = None) -> list[str]:
        """Per row, why it gets no request (`""`: send it): `empty_input` for an empty, None or blank
        instruction, `invalid_text` when the instruction, the input or one of `others[row]` is
        not valid UTF-8 (`reflection.row_checks`, as the reflection stages)."""
        instructions, inputs = self._texts(batch)
        others = others or [[] for _ in instructions]
        return [skip_reason(ins) or ("" if all(is_valid_text(t) for t in (inp, *more)) else "invalid_text")
                for ins, inp, more in zip(instructions, inputs, others)]


_LIST_TYPES = {"responses": "str", "avg_logprobs": "float64", "rank": "int64", "ranked_responses": "str",
               "ranked_avg_logprobs": "float64"}


def _typed(columns: dict) -> dict:
    """List columns holding only empty lists in this batch become typed `[rows, 0]` numpy arrays:
    from plain `[]`s `datasets` would infer `list<null>` and then fail to write a later batch
    that has values (a first batch of failed rows)."""
    import numpy as np

    for name, dtype in _LIST_TYPES.items():
        if name in columns and all(len(v) == 0 for v in columns[name]):
            columns[name] = np.empty((len(columns[name]), 0), dtype=dtype)
    return columns


def _list_column(batch: Mapping, name: str, stage: str) -> list[list]:
    require_columns(batch, [name], stage)
    values = list(batch[name])
    if values and isinstance(values[0], str):
        raise ColumnError(f"{stage}: column {name!r} holds strings, not lists: map with batched=True")
    return [list(v) if v is not None else [] for v in values]


@dataclass
class SampleResponses(_TunaStage):
    """Sample `n` responses per instruction with token logprobs (Tuna's probabilistic ranking data).

    Args:
        oracle: any oracle returning logprobs (`OpenAIOracle` on OpenAI, vLLM or llama.cpp;
            `TransformersOracle` computes them). A server that ignores `n` is asked again.
        n: responses per row (Tuna: 4). temperature, top_p, max_tokens, seed: sampling parameters
            (Tuna samples at temperature 1 with up to 512 tokens).
        template: how the instruction is put to the teacher: a scoring template name (`"alpaca"`,
            as Tuna prompts its teacher, default) or None for the bare instruction and input.
        system: an optional system message.
        logprobs: ask for token logprobs (default, what `rank_by_logprob` needs). False for the
            student's answers of the contextual ranking, which the judge ranks from the texts
            alone: a server without logprobs then answers instead of failing every row.

    Input columns: `instruction`, optional `input`, `id` (or `map(..., with_indices=True)`).
    Output columns: `responses` (list of `n` str), `avg_logprobs` (list of `n` float: the mean
    token log-probability of each response; NaN when the oracle gave none or the response has no
    token; only with `logprobs=True`), `sample_status` in `SAMPLE_STATUSES` (`oracle_error`,
    `empty_input` (blank instruction) and `invalid_text` rows have empty lists, and the last two
    send nothing; `missing_responses`: fewer than `n` responses or a blank one, kept as they came;
    without logprobs a row is otherwise `ok` once answered), and `sample_error` (`""` unless the
    oracle failed, nothing was sent or responses are missing: why). Every other column is kept.

    Example:
        >>> from reflectune_hf.oracles import TransformersOracle
        >>> from reflectune_hf.tuna.stages import SampleResponses
        >>> stage = SampleResponses(TransformersOracle(cache=False), n=2, max_tokens=8)
        >>> out = stage({"id": [0], "instruction": ["Name a colour."]})
        >>> len(out["responses"][0]), out["sample_status"]
        (2, ['ok'])
    """

    oracle: Any
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: Optional[int] = 512
    seed: Optional[int] = None
    template: Optional[str] = "alpaca"
    system: Optional[str] = None
    logprobs: bool = True
    usage: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    stage_name: ClassVar[str] = "SampleResponses"

    def __post_init__(self):
        self._validate()
        self._as_floats("temperature", "top_p")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def request(self, prompt: str) -> ChatRequest:
        """The request for one formatted prompt: `n` samples, with logprobs when `self.logprobs`."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return ChatRequest(messages=system + [{"role": "user", "content": prompt}], temperature=self.temperature,
                           top_p=self.top_p, max_tokens=self.max_tokens, n=self.n, logprobs=bool(self.logprobs),
                           seed=self.seed)

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out = self._ids(batch, indices, required=True)
        prompts, skips = self._prompts(batch), self._skips(batch)
        todo = [i for i, skip in enumerate(skips) if not skip]
        results = dict(zip(todo, self._complete([self.request(prompts[i]) for i in todo])))
        columns = {"responses": [], "avg_logprobs": [], "sample_status": [], "sample_error": []}
        for i, skip in enumerate(skips):
            result = results.get(i)
            if skip:
                row = ([], [], skip, _SKIP_MESSAGES[skip])
            elif not result.ok:
                row = ([], [], "oracle_error", result.error or "the oracle failed without a message")
            elif not self.logprobs:
                row = (list(result.texts), [], "ok", "")
            else:
                per_choice = list(result.logprobs or [])
                scores = [_mean_logprob(per_choice[k] if k < len(per_choice) else None)
                          for k in range(len(result.texts))]
                finite = sum(not math.isnan(s) for s in scores)
                status = ("ok" if finite == len(scores) else "no_logprobs" if finite == 0 else "partial_logprobs")
                row = (list(result.texts), scores, status, "")
            filled = sum(bool(str(t or "").strip()) for t in row[0])  # blank answers are no answers
            if row[2] == "ok" and filled < max(self.n, len(row[0])):
                row = (*row[:2], "missing_responses", f"{filled} of the {self.n} responses came back with text")
            for name, value in zip(columns, row):
                columns[name].append(value)
        bad = sum(s != "ok" for s in columns["sample_status"])
        if bad:
            logger.warning("%s: %d of %d rows %s (%s)", self.stage_name, bad, len(prompts),
                           "without full logprobs" if self.logprobs else "without responses",
                           sorted(set(columns["sample_status"]) - {"ok"}))
        if not self.logprobs:
            del columns["avg_logprobs"]
        return {**out, **_typed(columns)}


@versioned
def rank_by_logprob(batch: Mapping) -> dict:
    """Order each row's `responses` by `avg_logprobs`, highest first (Tuna's probabilistic ranking).

    For `Dataset.map(rank_by_logprob, batched=True)`. Responses without a score (NaN) and blank
    ones are left out of the ranking; ties keep the sampling order.

    Input columns: `responses`, `avg_logprobs` (lists of the same length per row).
    Output columns: `ranked_responses` (list of str, best first), `ranked_avg_logprobs` (their
    scores) and `ranking_status`: `ok`, `partial` (some responses had no score or were blank),
    `no_scores` (none had) or `no_responses` (none, or all blank). Every other column, `id` included, is kept.

    Example:
        >>> from reflectune_hf.tuna.stages import rank_by_logprob
        >>> out = rank_by_logprob({"responses": [["a", "b"]], "avg_logprobs": [[-2.0, float("nan")]]})
        >>> out["ranked_responses"], out["ranking_status"]
        ([['a']], ['partial'])
    """
    stage = "rank_by_logprob"
    responses, scores = _list_column(batch, "responses", stage), _list_column(batch, "avg_logprobs", stage)
    ranked, ranked_scores, statuses = [], [], []
    for row, (texts, values) in enumerate(zip(responses, scores)):
        if len(texts) != len(values):
            raise ColumnError(f"{stage}: row {row} of the batch has {len(texts)} responses but "
                              f"{len(values)} avg_logprobs")
        filled = [k for k, t in enumerate(texts) if str(t or "").strip()]  # a blank response is none
        usable = [k for k in filled if values[k] is not None and not math.isnan(values[k])]
        order = sorted(usable, key=lambda k: -values[k])  # stable: ties keep the sampling order
        ranked.append([texts[k] for k in order])
        ranked_scores.append([float(values[k]) for k in order])
        statuses.append("no_responses" if not filled else "ok" if len(usable) == len(texts)
                        else "partial" if usable else "no_scores")
    return _typed({"ranked_responses": ranked, "ranked_avg_logprobs": ranked_scores, "ranking_status": statuses})


@dataclass
class ContextualRank(_TunaStage):
    """Tuna's contextual ranking: a judge LLM ranks each row's `responses` plus its own reference.

    The judge gets Tuna's prompt (`reflectune_hf.prompts.tuna_ranking_messages`, byte-identical to
    the reference for 4 responses): the formatted instruction, `###Response 0..N-1`, and the steps
    (open/close-ended, write a reference `###Response N`, drop duplicates, score 0-15, `rank: [...]`).

    Args:
        oracle: the judge (Tuna used GPT-4). template: how the instruction is shown (`"alpaca"` as
            the reference, or None). temperature, top_p, max_tokens, seed: the reference's 1.0,
            1.0, 2048. format_retries: re-asks when no ranking can be read or the answer was cut
            by the token limit (then with twice `max_tokens`), as a distinct request (seed =
            attempt, temperature at least `retry_temperature`) so the cache cannot return the
            same answer. structured: `"auto"` (default) / `"on"` state the answer shape
            (`RankingAnswer`: analysis, `###Response N:`, score lines, `rank: [...]`) for the
            oracle to enforce where it can; `"off"` sends plain requests.

    Input columns: `instruction`, optional `input`, `responses` (list of str), `id`.
    Output columns: `ranking_raw` (the judge's text), `rank` (list of int, best first; index N is
    the judge's reference; duplicates, out-of-range indices and a ranked reference the judge did
    not write removed), `reference_response`, `ranked_responses` (the texts of `rank`, in order:
    `ranked_responses[i] == (responses + [reference_response])[rank[i]]`), `ranking_status`
    (`ok`; `repaired` when indices were dropped, the unwritten reference included; `partial` when
    the answer was cut by the token limit or a content filter even after the re-asks, or its
    `rank: [...]` list is not closed: `rank` holds the indices read so far, possibly not all;
    `no_ranking` (no list, or no index left once those were dropped: re-asked as a missing one),
    `no_responses`, `oracle_error`; `empty_input` (blank instruction) and `invalid_text` rows send nothing) and
    `ranking_error` (what went wrong). `TunaTrainer` trains on the
    `ranked_responses` of every row, whatever its status (a `partial` ranking is the start of the
    judge's order); filter on `ranking_status` first to leave such rows out.

    Example:
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.tuna.stages import ContextualRank
        >>> class Judge:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["###Response 2:\\nBlue.\\n\\nrank: [2, 1, 0, 1]"]) for _ in requests]
        >>> out = ContextualRank(Judge())({"id": [0], "instruction": ["Name a colour."], "responses": [["Red", "Sky"]]})
        >>> out["rank"], out["ranked_responses"], out["ranking_status"]
        ([[2, 1, 0]], [['Blue.', 'Sky', 'Red']], ['repaired'])
    """

    oracle: Any
    template: Optional[str] = "alpaca"
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: Optional[int] = 2048
    seed: Optional[int] = None
    format_retries: int = 1
    retry_temperature: float = 0.7
    structured: Any = "auto"
    usage: Optional[dict] = field(default=None, init=False, repr=False, compare=False)

    stage_name: ClassVar[str] = "ContextualRank"
    # Answer ranks in `ask`: a full ranking 0; a cut one (token limit, `worst_rank`) or an unclosed
    # list 1, re-asked with twice the budget but kept when nothing better comes; none found 2.

    def __post_init__(self):
        self._validate()
        self._as_floats("temperature", "top_p", "retry_temperature")
        if self.format_retries < 0:
            raise ValueError(f"format_retries must be >= 0, got {self.format_retries}")
        self.structured = structured_mode(self.structured)

    def _request(self, messages: list, attempt: int, num_responses: int = 4, longer: bool = False) -> ChatRequest:
        """The request of one attempt; `longer` (the re-ask of an answer cut by the token limit)
        doubles `max_tokens` (the oracle still caps it to what the context window leaves)."""
        temperature, seed = self.sampling(attempt)
        max_tokens = self.max_tokens * 2 if longer and self.max_tokens else self.max_tokens
        on = self.structured != "off" and num_responses <= 9  # one-digit indices in the shape
        shape = stage_answer_format("ranking", max_tokens, num_responses) if on else None
        return ChatRequest(messages=messages, temperature=temperature, top_p=self.top_p,
                           max_tokens=max_tokens, seed=seed, answer_format=shape)

    @staticmethod
    def _answer_rank(text: str, num_candidates: int) -> int:
        """0 for a full ranking, 1 for an unclosed `rank: [...]` list, 2 when none is found or no
        index is left (all out of range, or only the reference the judge did not write)."""
        parsed = parse_ranking(text, num_candidates)
        ref = num_candidates - 1
        usable = [k for k in parsed.rank if k != ref or extract_reference_response(text, ref)]
        return 2 if not usable else 1 if parsed.unclosed else 0

    def __call__(self, batch: Mapping, indices: Optional[Sequence[int]] = None) -> dict:
        out = self._ids(batch, indices, required=True)
        prompts = self._prompts(batch)
        responses = [["" if r is None else r for r in row] for row in _list_column(batch, "responses", self.stage_name)]
        ids = batch["id"] if "id" in batch else out["id"]  # `_ids(required=True)`: one or the other
        for row, texts in enumerate(responses):
            if any(not isinstance(r, str) for r in texts):
                raise ColumnError(f"{self.stage_name}: column 'responses' must hold lists of strings "
                                  f"(row id={ids[row]})")
        n, skips = len(prompts), self._skips(batch, responses)
        todo = [i for i in range(n) if responses[i] and not skips[i]]
        conversations = [tuna_ranking_messages(prompts[i], responses[i]) for i in todo]
        answers = self.ask(conversations,
                           [lambda text, k=len(responses[i]) + 1: self._answer_rank(text, k) for i in todo],
                           request=lambda j, attempt, longer: self._request(conversations[j], attempt,
                                                                            len(responses[todo[j]]), longer))
        texts, errors, answered, cut = [""] * n, [""] * n, [False] * n, [False] * n
        for i, answer in zip(todo, answers):
            texts[i], errors[i], answered[i] = answer.text, answer.error, answer.attempts > 0 and not answer.error
            cut[i] = answer.finish_reason in CUT_REASONS  # the token limit or a content filter stopped it
        columns = {name: [] for name in ("ranking_raw", "rank", "reference_response", "ranked_responses",
                                         "ranking_status", "ranking_error")}
        for i in range(n):
            row = (([], "", [], skips[i], _SKIP_MESSAGES[skips[i]]) if skips[i]
                   else self._row(texts[i], errors[i] if not answered[i] else None, responses[i], cut[i]))
            for name, value in zip(columns, (texts[i], *row)):
                columns[name].append(value)
        bad = [s for s in columns["ranking_status"] if s not in ("ok", "repaired")]
        if bad:
            logger.warning("%s: %d of %d rows without a full ranking (%s)", self.stage_name, len(bad), n,
                           sorted(set(bad)))
        return {**out, **_typed(columns)}

    @staticmethod
    def _row(text: str, error: Optional[str], responses: list, cut: bool = False) -> tuple:
        """(rank, reference_response, ranked_responses, status, error) of one row; `error` is None
        when the judge answered; `cut`: the answer kept was cut by the token limit or a content filter."""
        if not responses:
            return [], "", [], "no_responses", "the row has no responses to rank"
        if error is not None:
            return [], "", [], "oracle_error", error
        parsed = parse_ranking(text, len(responses) + 1)
        reference = extract_reference_response(text, len(responses))
        if not parsed.found:
            return [], reference, [], "no_ranking", "no 'rank:' or 'ranking:' list with an index in the answer"
        notes = []
        if parsed.duplicates:
            notes.append(f"dropped repeated indices {parsed.duplicates}")
        if parsed.out_of_range:
            notes.append(f"dropped out-of-range indices {parsed.out_of_range} (valid: 0..{len(responses)})")
        rank = parsed.rank
        if len(responses) in rank and not reference:  # nothing to train on for it: out of both columns
            rank = [k for k in rank if k != len(responses)]
            notes.append(f"index {len(responses)} is ranked but the judge wrote no reference response: dropped")
        if not rank:  # nothing left to train on: no ranking, whatever was repaired
            return [], reference, [], "no_ranking", "no usable index in the ranking: " + "; ".join(notes)
        incomplete = []
        if cut:
            incomplete.append("the judge's answer was cut by the token limit or a content filter: the ranking may "
                              "be incomplete")
        elif parsed.unclosed:
            incomplete.append("the ranking list is not closed: it may be incomplete")
        status = "partial" if incomplete else "repaired" if notes else "ok"
        candidates = list(responses) + [reference]
        return rank, reference, [candidates[k] for k in rank], status, "; ".join(incomplete + notes)
