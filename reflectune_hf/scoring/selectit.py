"""SelectIT: uncertainty-aware self-reflection scores from base models (REFERENCE.md §9).

A base model reads a raw rating prompt (one of nine rating lines, then the pair, then
`"The answer is: \\n"`) and the next-token probabilities of the ratings "1".."5" are turned
into scores at three levels:

- token level: `P' = P / sum(P)`, `S_base = argmax(P') + 1`,
  `S_token = S_base * sum_i |P'_i - P'_max| / (N - 1)` with N = 5 ratings (range [0, 5]);
- sentence level: the token scores of the first K rating prompts,
  `S_sent = mean / (1 + alpha * std)` (population std, as the reference's `np.std`);
- model level: `S_model = sum_m (params_m / sum params) * S_sent_m` over several models.

The formula functions (`rating_distribution`, `token_scores`, `sentence_scores`,
`model_weights`, `model_scores`) are pure numpy, vectorised over leading dimensions, and live
in `reflectune_hf.scoring.selectit_math` (re-exported here); `SelectITScorer` runs the models. `formula="reference"` reproduces the reference code's
extra exp-renormalisation `P' = softmax(P / sum(P))` for comparison. Differences from the
reference code, on purpose: rating-token ids are looked up in each tokenizer (the reference
hard-codes Llama-2's), the token-level spread runs over the five ratings and is divided by 4 (the reference
sums over the first K ratings and divides by K - 1, K the prompt count: equal at its default
K = 5; `formula="reference"` does as the reference), the model weights are parameter
counts (the reference's 7/20, 13/20, 70/90 do not sum to 1), prompts are batched with left
padding, and a row that fails gets NaN and a status instead of being skipped (which shifts
every later score in the reference). Argmax ties go to the lower rating, as `np.argmax`.

Selection (top 20 % by the model-level score; SelectIT scores go up to 5, so no `max_value`):

    >>> from reflectune_hf.selection.select import top_k_by                          # doctest: +SKIP
    >>> chosen = top_k_by(scored, "selectit_model", fraction=0.2, max_value=None)  # doctest: +SKIP

Example:
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.scoring.selectit import SelectITScorer
    >>> scored = load_sample().select(range(2)).map(SelectITScorer(k=2), batched=True)
    >>> scored[0]["selectit_status"], 0 <= scored[0]["selectit_sentence"] <= 5
    ('ok', True)
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

from ..data import batch_size_of, require_columns, text_column
from ..models import default_device, load_causal_lm, load_tokenizer, model_identity, torch_dtype
from ..prompts import NEWLINE_SEPARATOR, SELECTIT_RATING_LINES, join_input, selectit_prompt
from ..reflection.row_checks import is_valid_text
from ..utils import LazyState, package_version
from .selectit_math import (FORMULAS, RATINGS, model_scores, model_weights, normalize_ratings,  # noqa: F401
                            rating_distribution, sentence_scores, token_scores)
from .served import StudentServer, StudentServerError
from .served_parse import request_failed_rows

logger = logging.getLogger(__name__)

# Bump when the scores' computation changes, so datasets' cache does not serve stale scores.
SELECTIT_VERSION = 2  # 2: selectit_model and selectit_sentence_by_model with one model too
STAGE = "SelectITScorer"


class RatingTokenError(ValueError):
    """A tokenizer has no single token for one of the ratings "1".."5"."""


# ---------------------------------------------------------------------------------------------
# Prompts and rating tokens
# ---------------------------------------------------------------------------------------------


def rating_prompts_for(instruction: str, input: str, output: str, rating_lines: Sequence[str]) -> list[str]:
    """The raw rating prompts of one row, one per rating line; a non-empty `input` is joined to
    the instruction with a newline.

    Example:
        >>> from reflectune_hf.scoring.selectit import rating_prompts_for
        >>> rating_prompts_for("Add", "2+2", "4", ["Rate it."])
        ['Rate it.\\nInstruction:Add\\n2+2\\nResponse:4\\nThe answer is: \\n']
    """
    query = join_input(instruction, input, NEWLINE_SEPARATOR)
    return [selectit_prompt(line, query, output) for line in rating_lines]


def _decodes_to(tokenizer, token_id: int, digit: str) -> bool:
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return text in (digit, " " + digit)


def rating_token_ids(tokenizer) -> tuple[tuple[int, ...], ...]:
    """The single-token ids of the ratings "1".."5" in `tokenizer`, with and without a leading
    space (`"1"`, `"Ġ1"`, `"▁1"`...): one sorted tuple per rating. Every id found decodes to
    the digit, optionally after one space.

    Raises `RatingTokenError` when a rating has no single token.

    Example:
        >>> from reflectune_hf.models import load_tokenizer
        >>> from reflectune_hf.scoring.selectit import rating_token_ids
        >>> rating_token_ids(load_tokenizer("smollm2-135m-instruct"))
        ((33,), (34,), (35,), (36,), (37,))
    """
    vocab = tokenizer.get_vocab()
    found, missing = [], []
    for digit in RATINGS:
        candidates = {vocab[piece] for piece in (digit, "Ġ" + digit, "▁" + digit) if piece in vocab}
        for text in (digit, " " + digit):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                candidates.add(ids[0])
        ids = tuple(sorted(i for i in candidates if _decodes_to(tokenizer, i, digit)))
        if not ids:
            missing.append(digit)
        found.append(ids)
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise RatingTokenError(
            f"{STAGE}: the tokenizer {name!r} has no single token for the rating(s) {missing} (looked for "
            "'1'..'5' with and without a leading space). SelectIT reads the next-token probability of each "
            "rating, so it needs a model whose tokenizer has one token per digit."
        )
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------


class _Rater:
    """One loaded model: tokenizer, rating ids, parameter count, batched last-token ratings."""

    def __init__(self, name: str, dtype: str, device: str):
        self.name = name
        self.model, self.tokenizer = load_causal_lm(name, dtype=dtype, device=device)
        self.rating_ids = rating_token_ids(self.tokenizer)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # tied weights once
        self.device = next(self.model.parameters()).device

    def ratings(self, batch_ids: list[list[int]]):
        """Rating probabilities `[len(batch_ids), 5]` (float64) of left-padded prompts: one
        forward pass, the language-model head on the last position only."""
        import torch

        width = max(len(ids) for ids in batch_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(batch_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
        for row, ids in enumerate(batch_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens start at position 0
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), logits_to_keep=1, use_cache=False,
            ).logits[:, -1, :]
            probs = torch.softmax(logits.float(), dim=-1)
            columns = [probs[:, list(ids)].sum(-1) for ids in self.rating_ids]
        return torch.stack(columns, -1).double().cpu().numpy()


class _ServedRater:
    """A model served by vLLM / llama.cpp (`scoring.served`): the local tokenizer and rating ids,
    the next-token rating probabilities from the server's top-k log-probabilities."""

    batch_size = 1 << 30  # all prompts of a map batch at once: the server's concurrency bounds them
    model = None  # no weights here (no context limit known but `max_length`)

    def __init__(self, name: str, server: StudentServer, top_logprobs: int):
        self.name, self.server, self.top_logprobs = name, server, top_logprobs
        self.tokenizer = load_tokenizer(name)
        self.rating_ids = rating_token_ids(self.tokenizer)
        self.n_params = None
        self.problems: dict = {}  # prompt ids -> the row status of a prompt without ratings

    def ratings(self, batch_ids: list[list[int]]):
        out = np.full((len(batch_ids), len(RATINGS)), np.nan)
        answers = self.server.rating_probabilities(self.tokenizer, batch_ids, self.rating_ids, self.top_logprobs)
        for row, (ids, value) in enumerate(zip(batch_ids, answers)):
            if isinstance(value, Exception):
                status = getattr(value, "status", None)
                self.problems[tuple(ids)] = (f"{status}:{self.name}" if status
                                             else f"error:{self.name}:{type(value).__name__}: {value}")
            else:
                out[row] = value
        return out

    def problem(self, prompts: list[list[int]]) -> Optional[str]:
        """The status of the first of `prompts` that got no ratings, or None."""
        return next((self.problems[tuple(p)] for p in prompts if tuple(p) in self.problems), None)


class SelectITScorer(LazyState):
    """Add SelectIT's token, sentence and model-level scores to a batch of Alpaca rows.

    Input columns: `instruction`, `output` (str), optional `input` (str; absent means `""`).
    Output columns (float, NaN where undefined):
    - `selectit_token`: token-level score of the first model on the first rating prompt;
    - `selectit_sentence`: sentence-level score of the first model over the K prompts;
    - `selectit_sentence_by_model` (list of float, in the order of `models`) and
      `selectit_model`, their parameter-count-weighted sum: with one model, the sentence score
      itself, so a selection on `selectit_model` works whatever the number of models;
    - `selectit_status` (str): `"ok"`, or the `;`-joined reasons a score is NaN among
      `invalid_text` (a text is not valid UTF-8: a lone surrogate), `empty_instruction`,
      `empty_output`, `too_long:<model>` (a prompt over `max_length` tokens), `non_finite:<model>`,
      `rating_outside_top_k:<model>` (served) and `error:<model>:<Type>: <message>`.
    Map it with `scoring.ifd.map_scores(data, scorer)` for a 0-row split to get these columns too.

    Args:
        models: embedded aliases, local directories or Hub ids of (base) causal LMs, loaded on
            first call; a single string is one model.
        k: how many rating prompts the sentence level uses (the first k of `rating_prompts`).
        alpha: the sentence level's uncertainty penalty.
        rating_prompts: the rating lines; default the nine of the paper.
        formula: `"paper"` (default) or `"reference"` (the reference code's
            exp-renormalisation, and its token-level spread over the first `k` ratings / (k - 1)).
        dtype: `"float32"` (exact), `"bfloat16"` or `"float16"`.
        device: `"cpu"`, `"cuda"`...; default CUDA when present, else CPU.
        batch_size: prompts per forward pass (prompts are sorted by length first). It never
            changes a score beyond float rounding, so, like `device`, it is not part of the
            datasets fingerprint (nor of the pickled state: `num_proc` workers use the default).
        max_length: longest prompt in tokens; a longer row gets `too_long:<model>`.
        base_url: rate with a model served by vLLM or llama.cpp (`scoring.served`; one model):
            only its tokenizer is loaded here; the rating probabilities come from the server's
            top-`top_logprobs` next-token log-probabilities (vLLM caps them with
            `--max-logprobs`, default 20). A prompt whose rating tokens are not all among them
            gets `rating_outside_top_k:<model>`. server_model: the name on the server (default
            the model's); student_backend, max_concurrency, timeout, max_retries, cache: as
            `IFDScorer`'s.

    Rating tokens are looked up in each tokenizer (`rating_token_ids`); a rating spelled by
    several tokens ("1", " 1") gets the sum of their probabilities. The datasets fingerprint
    is the configuration plus `model_identity` of each model and the package and SelectIT
    versions: a repeated `map` is served from the cache without loading a model.

    Example:
        >>> from reflectune_hf.scoring.selectit import SelectITScorer
        >>> scorer = SelectITScorer(k=2)
        >>> out = scorer({"instruction": ["Name a colour."], "output": ["Blue."]})
        >>> out["selectit_status"], out["selectit_model"] == out["selectit_sentence"]
        (['ok'], True)
    """

    _transient = ("_raters", "device", "batch_size")  # runtime knobs: not in the fingerprint
    _transient_defaults = {"batch_size": 16}
    # The columns written and their types: the schema of a 0-row result (`map_scores`).
    output_features = {"selectit_token": "float64", "selectit_sentence": "float64", "selectit_status": "string",
                       "selectit_sentence_by_model": ["float64"], "selectit_model": "float64"}

    def __init__(self, models=("smollm2-135m-instruct",), k: int = 5, alpha: float = 0.2,
                 rating_prompts: Optional[Sequence[str]] = None, formula: str = "paper",
                 dtype: str = "float32", device: Optional[str] = None, batch_size: int = 16,
                 max_length: int = 2048, base_url: Optional[str] = None, server_model: Optional[str] = None,
                 student_backend: str = "auto", top_logprobs: int = 20, max_concurrency: int = 16,
                 timeout: float = 300.0, max_retries: int = 6, cache=True):
        models = (models,) if isinstance(models, str) else tuple(models)
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{STAGE}: models must be one or more model names, got {models!r}")
        if isinstance(rating_prompts, str):
            raise ValueError(f"{STAGE}: rating_prompts must be a sequence of rating lines, not one string")
        lines = tuple(SELECTIT_RATING_LINES if rating_prompts is None else rating_prompts)
        if not all(isinstance(line, str) and line for line in lines):
            raise ValueError(f"{STAGE}: rating_prompts must be non-empty strings")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(lines):
            raise ValueError(f"{STAGE}: k must be an int in [1, {len(lines)}] (the number of rating prompts), got {k!r}")
        if not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"{STAGE}: alpha must be a number >= 0, got {alpha!r}")
        if formula not in FORMULAS:
            raise ValueError(f"{STAGE}: formula must be one of {FORMULAS}, got {formula!r}")
        if formula == "reference" and k < 2:
            raise ValueError(f"{STAGE}: formula='reference' needs k >= 2 (the reference code divides by k - 1)")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"{STAGE}: batch_size and max_length must be >= 1")
        torch_dtype(dtype)  # fail now on an unknown dtype, not at the first batch
        if base_url and len(models) != 1:
            raise ValueError(f"{STAGE}: a served student (base_url) rates with one model; the model level "
                             "weighs several by their parameter counts, which a server does not give")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 5:
            raise ValueError(f"{STAGE}: top_logprobs must be an integer >= 5 (the ratings), got {top_logprobs!r}")
        self.server = None if not base_url else StudentServer(
            base_url, server_model or models[0], student_backend, max_concurrency, timeout, max_retries, cache)
        self.top_logprobs = int(top_logprobs)
        self.models = models
        self.k = k
        self.alpha = float(alpha)
        self.rating_prompts = lines[:k]
        self.formula = formula
        self.dtype = str(dtype)
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self._identity = {"models": [model_identity(m) for m in models], "package": package_version(),
                          "selectit": SELECTIT_VERSION}
        if self.server is not None:  # the server's model and precision; the local tokenizer
            self._identity.update(server=self.server.identity(), top_logprobs=self.top_logprobs)
        self._raters = None

    def raters(self) -> list[_Rater]:
        """The loaded models (loaded on first use)."""
        if self._raters is None and self.server is not None:
            self._raters = [_ServedRater(self.models[0], self.server, self.top_logprobs)]
        if self._raters is None:
            device = default_device(self.device)
            self._raters = [_Rater(name, self.dtype, device) for name in self.models]
        return self._raters

    @property
    def weights(self) -> np.ndarray:
        """The model-level weights (parameter counts; loads the models)."""
        return model_weights([r.n_params for r in self.raters()])

    def _rate(self, rater: _Rater, prompts: list[list[int]], reasons: list[list[str]], owner: list[int]):
        """Rating probabilities `[len(prompts), 5]`: sorted micro-batches, then one prompt at a
        time for a micro-batch that raised; a prompt that still raises is NaN with a reason."""
        out = np.full((len(prompts), len(RATINGS)), np.nan)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        size = getattr(rater, "batch_size", None) or self.batch_size
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            try:
                out[chunk] = rater.ratings([prompts[i] for i in chunk])
                continue
            except StudentServerError:  # the served student cannot work at all: one clear error
                raise
            except Exception as exc:  # noqa: BLE001 - retried one by one, then recorded per row
                if len(chunk) == 1:
                    reasons[owner[chunk[0]]].append(f"error:{rater.name}:{type(exc).__name__}: {exc}")
                    continue
                logger.warning("%s: a batch of %d prompts failed (%s); retrying one by one", STAGE, len(chunk), exc)
            for i in chunk:
                try:
                    out[i] = rater.ratings([prompts[i]])[0]
                except Exception as exc:  # noqa: BLE001
                    reasons[owner[i]].append(f"error:{rater.name}:{type(exc).__name__}: {exc}")
        return out

    def _sentence(self, rater: _Rater, texts: list[list[str]], todo: list[int], reasons: list[list[str]]):
        """Token `[n]` and sentence `[n]` scores of one model for the rows in `todo`."""
        n, k = len(texts), self.k
        token, sentence = np.full(n, np.nan), np.full(n, np.nan)
        config = getattr(rater.model, "config", None)
        limit = min(self.max_length, getattr(config, "max_position_embeddings", None) or self.max_length)
        prompts, owner, rows = [], [], []
        for row in todo:
            ids = rater.tokenizer(texts[row], add_special_tokens=True)["input_ids"]
            if max(len(x) for x in ids) > limit:
                reasons[row].append(f"too_long:{rater.name}")
                continue
            prompts.extend(ids)
            owner.extend([row] * k)
            rows.append(row)
        if not rows:
            return token, sentence
        scores = token_scores(self._rate(rater, prompts, reasons, owner), self.formula, k).reshape(len(rows), k)
        for j, row in enumerate(rows):
            if not np.isfinite(scores[j]).all():
                problem = rater.problem(prompts[j * k:(j + 1) * k]) if hasattr(rater, "problem") else None
                if problem:
                    reasons[row].append(problem)
                elif not any(r.startswith(f"error:{rater.name}:") for r in reasons[row]):
                    reasons[row].append(f"non_finite:{rater.name}")
                continue
            token[row] = scores[j, 0]
            sentence[row] = sentence_scores(scores[j], self.alpha)
        return token, sentence

    def failed_rows(self, dataset) -> list[int]:
        """Rows of a scored `dataset` whose served request failed: `map_scores` scores them again."""
        return request_failed_rows(dataset, "selectit_status")

    def __call__(self, batch: dict) -> dict:
        require_columns(batch, ["instruction", "output"], STAGE)
        # As IFDScorer: one example holds a str (or None) where a batch holds a list.
        single = isinstance(batch["output"], str) or batch["output"] is None
        if single:  # map without batched=True: one example
            batch = {key: [value] for key, value in batch.items()}
        n = batch_size_of(batch)
        instructions = text_column(batch, "instruction", STAGE)
        outputs = text_column(batch, "output", STAGE)
        inputs = text_column(batch, "input", STAGE) if "input" in batch else [""] * n
        reasons: list[list[str]] = [[] for _ in range(n)]
        for row in range(n):
            if not all(is_valid_text(t) for t in (instructions[row], inputs[row], outputs[row])):
                reasons[row].append("invalid_text")  # a lone surrogate: no tokenizer reads it
                continue
            if not instructions[row].strip():
                reasons[row].append("empty_instruction")
            if not outputs[row].strip():
                reasons[row].append("empty_output")
        todo = [row for row in range(n) if not reasons[row]]
        texts = [rating_prompts_for(instructions[r], inputs[r], outputs[r], self.rating_prompts) for r in range(n)]
        per_model = []
        token = sentence = np.full(n, np.nan)
        for m, rater in enumerate(self.raters() if todo else []):
            tok_m, sent_m = self._sentence(rater, texts, todo, reasons)
            if m == 0:
                token, sentence = tok_m, sent_m
            per_model.append(sent_m)
        result = {
            "selectit_token": _floats(token, n),
            "selectit_sentence": _floats(sentence, n),
            "selectit_status": [";".join(r) if r else "ok" for r in reasons],
        }
        stacked = np.stack(per_model, -1) if per_model else np.full((n, len(self.models)), np.nan)
        if len(self.models) == 1:
            combined = stacked[:, 0]  # weight 1: the sentence score, without loading the model for its size
        else:
            combined = model_scores(stacked, [r.n_params for r in self.raters()]) if per_model else stacked[:, 0]
        result["selectit_sentence_by_model"] = [_floats(row, len(self.models)) for row in stacked]
        result["selectit_model"] = _floats(combined, n)
        if single:
            return {key: value[0] for key, value in result.items()}
        return result


def _floats(values: np.ndarray, n: int) -> list[float]:
    values = np.asarray(values, dtype=np.float64).reshape(n)
    return [float(v) if math.isfinite(v) else math.nan for v in values]
