"""`TransformersOracle`: a local causal LM as the oracle (no server, no network).

Any transformers checkpoint works here; for an embedded GGUF model, `local:<model>` runs
`LlamaCppOracle` (`llamacpp_local`) by default, faster on a CPU, and this one with
`--local_engine transformers`.

Prompts go through the tokenizer's chat template and are generated in batches of `batch_size`
by `local_decode.decode`: one prefill, then one token per step for the rows still running
(finished rows leave the batch), each request reported - cached, counted, and advancing the
progress bar - the moment it ends. Temperature 0 is greedy decoding (the same text as
`model.generate` in fp32); otherwise multinomial sampling with the request's temperature and
top_p (and no top-k, as OpenAI-style APIs). `n` sampled choices share one prefill (greedy
decoding yields one choice repeated `n` times). A request with a `seed` draws from its own random
generator, so its answer does not depend on its batch neighbours' draws and the global random
state is untouched; requests with seeds share batches (the stages' re-asks, all seeded, were
decoded one at a time). Logprobs are the model's own log-probabilities (before temperature
and before any format mask) of the generated tokens, with the `top_logprobs` best alternatives.

Token budget: a request's `max_tokens` and the oracle's `max_new_tokens` both cap the answer
(the smaller wins), and so does the context window (`max_position_embeddings`): the budget is
`min(max_tokens, max_new_tokens, context - prompt_tokens)`, so a long row gets a shorter answer
(`finish_reason "length"`) instead of an error; only a prompt that fills the context fails.

A request with an `answer_format` (`structured.py`) is decoded under that shape's regex
(`structured="auto"`, the default, or `"on"`): a token mask per step from llguidance, so the
answer always has the stage's markers. `structured="off"` drops the format (plain text).

Answers are cached in the `OracleCache` like any oracle's (model key: the resolved model and
dtype; server: `"local"`).

Example:
    >>> from reflectune_hf.oracles import ChatRequest, TransformersOracle
    >>> oracle = TransformersOracle(max_new_tokens=8, cache=False)
    >>> result = oracle.complete([ChatRequest([{"role": "user", "content": "Say hi."}])])[0]
    >>> result.ok and result.finish_reasons[0] in ("stop", "length")
    True
"""

from __future__ import annotations

import logging
from itertools import groupby
from pathlib import Path
from typing import ClassVar, Optional

from ..models import EMBEDDED_MODELS, load_causal_lm, model_identity, resolve_model
from ..utils import stable_hash
from .base import ChatRequest, ChatResult, OracleConfigurationError
from .cache import CachingOracle

logger = logging.getLogger(__name__)


class TransformersOracle(CachingOracle):
    """Batched local generation with a transformers causal LM.

    Args:
        model: an embedded alias, a Hub id (available offline) or a local directory.
        batch_size: prompts per `generate` call (divided by `n` for sampled multi-choice).
        max_new_tokens: used when a request has no `max_tokens`.
        dtype: "float32" (default), "bfloat16" or "float16". device: default CUDA if visible.
        cache: True (default cache file), False, a path or an `OracleCache`.
        progress: a tqdm bar advancing per request; None (default) shows it when more than one
            request is generated.
        structured: "auto" (default) or "on": enforce each request's `answer_format` by
            constrained decoding ("on" raises if llguidance is missing, "auto" logs it and
            answers in free text); "off": ignore answer formats.

    The model loads on first use in each process; pickling keeps the configuration only
    (`batch_size`, `device` and `progress` are speed knobs, outside the datasets fingerprint:
    `num_proc` workers use their defaults).
    """

    _transient: ClassVar[tuple[str, ...]] = CachingOracle._transient + (
        "_model", "_tokenizer", "_identity_cache", "_constraints", "batch_size", "device", "progress")
    _transient_defaults: ClassVar[dict] = {"batch_size": 8}  # speed knobs: not in the fingerprint

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 8, max_new_tokens: int = 512,
                 dtype: str = "float32", device: Optional[str] = None, cache=True, progress: Optional[bool] = None,
                 structured: str = "auto"):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        structured = {True: "on", False: "off"}.get(structured, structured)
        if structured not in ("auto", "on", "off"):
            raise ValueError(f"structured must be 'auto', 'on' or 'off', got {structured!r}")
        self.structured = structured
        self.model = str(model)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.dtype = str(dtype)
        self.device = device
        self.cache = cache
        self.progress = progress

    def __repr__(self) -> str:
        return f"TransformersOracle(model={self.model!r}, dtype={self.dtype!r}, batch_size={self.batch_size})"

    def _identity(self) -> tuple[str, str]:
        """The cache key's model: its name and what the weights are (`models.model_identity`, the
        rule the datasets fingerprints use too)."""
        if getattr(self, "_identity_cache", None) is None:
            try:
                resolved = Path(resolve_model(self.model))
            except Exception as err:  # noqa: BLE001 - any failure to find the model is a configuration error
                raise OracleConfigurationError(f"Cannot find the model {self.model!r}: {err}") from err
            name = str(resolved.resolve()) if resolved.is_dir() and self.model not in EMBEDDED_MODELS else self.model
            ident = f"{name}@{stable_hash(model_identity(self.model))}"  # the weights, by the one rule
            self._identity_cache = f"transformers:{ident}:{self.dtype}"
        return self._identity_cache, "local"

    def fingerprint_identity(self) -> dict:
        """The package version and the weights (`models.model_identity`): retrained weights in a
        local directory, or a new Hub snapshot, give the stages using this oracle a new datasets
        fingerprint."""
        try:
            weights = model_identity(self.model)
        except Exception:  # noqa: BLE001 - pickling must not fail; a missing model fails when loaded
            weights = None
        return {**super().fingerprint_identity(), "weights": weights}

    def _prepare(self, request: ChatRequest) -> ChatRequest:
        """The request as sent and keyed: budget `min(max_tokens, max_new_tokens)` (the smaller wins),
        and no answer format when `structured="off"`."""
        from dataclasses import replace

        budget = self.max_new_tokens if request.max_tokens is None else min(request.max_tokens, self.max_new_tokens)
        changes = {"max_tokens": budget} if budget != request.max_tokens else {}
        if self.structured == "off" and getattr(request, "answer_format", None) is not None:
            changes["answer_format"] = None
        return replace(request, **changes) if changes else request

    def _load(self):
        if getattr(self, "_model", None) is None:
            try:
                self._model, tokenizer = load_causal_lm(self.model, dtype=self.dtype, device=self.device)
            except (OSError, ValueError) as err:
                raise OracleConfigurationError(f"Cannot load the model {self.model!r}: {err}") from err
            tokenizer.padding_side = "left"
            if getattr(tokenizer, "chat_template", None) is None:
                raise OracleConfigurationError(f"The tokenizer of {self.model!r} has no chat template")
            self._tokenizer = tokenizer
        return self._model, self._tokenizer

    def load(self) -> "TransformersOracle":
        """Load the model now (it loads on the first request otherwise): to time generation alone,
        or to fail early on a missing model. Returns the oracle."""
        self._load()
        return self

    # -- sending ------------------------------------------------------------------------------
    def _constraint(self, request: ChatRequest, tokenizer):
        """The `LocalConstraint` enforcing `request.answer_format`, or None (plain text)."""
        from .local_decode import request_constraint

        return request_constraint(self.__dict__.setdefault("_constraints", {}), request, tokenizer, self.structured)

    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        from tqdm.auto import tqdm

        from .local_decode import prompt_ids

        model, tokenizer = self._load()
        ids = prompt_ids(tokenizer, requests)  # a str: the row's template error
        limit = getattr(model.config, "max_position_embeddings", None)
        # Each request's budget: min(max_tokens, context - prompt), so a long row gets a shorter answer.
        budgets = [0 if isinstance(i, str) else min(r.max_tokens, limit - len(i)) if limit else r.max_tokens
                   for r, i in zip(requests, ids)]
        results: list[Optional[ChatResult]] = [None] * len(requests)
        show = self.progress if self.progress is not None else len(requests) > 1
        bar = tqdm(total=len(requests), desc=f"oracle {Path(self.model).name}", unit="req", disable=not show,
                   leave=False)

        def finish(i: int, result: ChatResult) -> None:
            results[i] = result
            on_result(i, result)
            bar.update(1)

        todo = []
        for i in range(len(requests)):
            if isinstance(ids[i], str):
                finish(i, ChatResult.failure(ids[i]))
            elif budgets[i] < 1:
                finish(i, ChatResult.failure(f"prompt of {len(ids[i])} tokens exceeds the model's context of "
                                             f"{limit} tokens (no room for an answer): shorten the row"))
            else:
                todo.append(i)
        try:
            for batch in self._batches(requests, todo, [len(i) for i in ids]):
                try:
                    self._generate(batch, requests, ids, budgets, finish)
                except Exception as err:  # noqa: BLE001 - isolate the failing row(s)
                    left = [i for i in batch if results[i] is None]
                    logger.debug("batch failed (%s); retrying its %d unanswered rows one by one", err, len(left))
                    for i in left:
                        try:
                            self._generate([i], requests, ids, budgets, finish)
                        except Exception as one:  # noqa: BLE001
                            if results[i] is None:
                                finish(i, ChatResult.failure(f"generation failed: {type(one).__name__}: {one}"))
        finally:
            bar.close()
        return results

    def _batches(self, requests: list[ChatRequest], todo: list[int], lengths: list[int]) -> list[list[int]]:
        """Rows with the same sampling settings, longest first, in chunks of `batch_size` rows (a
        sampled request's `n` choices are rows). Seeds may differ within a chunk: each seeded
        request draws from its own generator."""
        def setting(i: int):
            r = requests[i]
            greedy = r.temperature == 0
            return (greedy, 0.0 if greedy else r.temperature, 1.0 if greedy else r.top_p, r.n,
                    r.logprobs, r.top_logprobs or 0)

        batches = []
        for key, group in groupby(sorted(todo, key=lambda i: (setting(i), -lengths[i])), key=setting):
            rows = list(group)
            size = max(1, self.batch_size // (1 if key[0] else key[3]))
            batches += [rows[k:k + size] for k in range(0, len(rows), size)]
        return batches

    def _generate(self, batch: list[int], requests: list[ChatRequest], ids: list[list[int]], budgets: list[int],
                  finish) -> None:
        """Generate for the requests `batch` (one sampling setting); `finish(i, result)` as each ends."""
        from .local_decode import decode

        model, tokenizer = self._load()
        request = requests[batch[0]]
        greedy = request.temperature == 0
        copies = 1 if greedy else request.n
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
        rows: dict[int, list] = {}

        def on_row(p: int, c: int, tokens: list[int], reason: str, logprobs) -> None:
            rows.setdefault(p, [None] * copies)[c] = (tokens, reason, logprobs)
            if any(x is None for x in rows[p]):
                return
            i = batch[p]
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t, _, _ in rows[p]]
            reasons = [r for _, r, _ in rows[p]]
            completion = sum(len(t) for t, _, _ in rows[p])
            entries = [self._token_logprobs(tokenizer, lp) for _, _, lp in rows[p]] if request.logprobs else None
            if greedy and request.n > 1:
                texts, reasons, completion = texts * request.n, reasons * request.n, completion * request.n
                entries = entries * request.n if entries is not None else None
            prompt_tokens = len(ids[i])
            finish(i, ChatResult(texts=texts, finish_reasons=reasons, logprobs=entries,
                                 usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                        "total_tokens": prompt_tokens + completion}))

        decode(model, [ids[i] for i in batch], [budgets[i] for i in batch], eos=eos,
               pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
               greedy=greedy, temperature=request.temperature, top_p=request.top_p,
               seed=None if greedy else [requests[i].seed for i in batch], copies=copies,
               top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
               constraints=[self._constraint(requests[i], tokenizer) for i in batch], on_row=on_row)

    @staticmethod
    def _token_logprobs(tokenizer, steps) -> list[dict]:
        return [{"token": tokenizer.decode([token]), "logprob": float(logprob),
                 "top_logprobs": [{"token": tokenizer.decode([alt]), "logprob": float(value)} for alt, value in alts]}
                for token, logprob, alts in steps]
