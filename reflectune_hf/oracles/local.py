"""`TransformersOracle`: a local causal LM as the oracle (no server, no network).

Prompts go through the tokenizer's chat template, are left-padded and generated in batches of
`batch_size`. Temperature 0 is greedy decoding; otherwise multinomial sampling with the
request's temperature and top_p (and no top-k, as OpenAI-style APIs). `n` choices come from
`num_return_sequences` (greedy decoding yields one choice repeated `n` times). A request with a
`seed` is generated alone under that seed, so its answer does not depend on its batch
neighbours. Logprobs are the model's own log-probabilities (before temperature) of the
generated tokens, with the `top_logprobs` best alternatives; asking for them keeps the logits
of every step of a batch in memory, so lower `batch_size` for long outputs.

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
from contextlib import nullcontext
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
        progress: show a tqdm bar; None shows it for more than 4 batches.

    The model loads on first use in each process; pickling keeps the configuration only.
    """

    _transient: ClassVar[tuple[str, ...]] = CachingOracle._transient + ("_model", "_tokenizer", "_identity_cache")

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 8, max_new_tokens: int = 512,
                 dtype: str = "float32", device: Optional[str] = None, cache=True, progress: Optional[bool] = None):
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
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
        """The cache key's model: what the weights are (alias version, or files' sizes and times)."""
        if getattr(self, "_identity_cache", None) is None:
            try:
                resolved = Path(resolve_model(self.model))
            except Exception as err:  # noqa: BLE001 - any failure to find the model is a configuration error
                raise OracleConfigurationError(f"Cannot find the model {self.model!r}: {err}") from err
            if self.model in EMBEDDED_MODELS:
                ident = resolved.name
            elif resolved.is_dir():
                files = sorted(p for p in resolved.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
                ident = f"{resolved.resolve()}@" + stable_hash([(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                                 for p in files])
            else:  # a Hub id: with the commit of its local snapshot when known
                revision = model_identity(self.model).get("revision")
                ident = f"{self.model}@{revision}" if revision else self.model
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
        if request.max_tokens is not None:
            return request
        from dataclasses import replace

        return replace(request, max_tokens=self.max_new_tokens)

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

    # -- sending ------------------------------------------------------------------------------
    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        from tqdm.auto import tqdm

        model, tokenizer = self._load()
        prompts = [tokenizer.apply_chat_template(r.message_dicts, add_generation_prompt=True, tokenize=False)
                   for r in requests]
        lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        limit = getattr(model.config, "max_position_embeddings", None)
        results: list[Optional[ChatResult]] = [None] * len(requests)

        def finish(i: int, result: ChatResult) -> None:
            results[i] = result
            on_result(i, result)

        todo = []
        for i, request in enumerate(requests):
            if limit and lengths[i] + request.max_tokens > limit:
                finish(i, ChatResult.failure(f"prompt of {lengths[i]} tokens + max_tokens {request.max_tokens} "
                                             f"exceeds the model's context of {limit} tokens"))
            else:
                todo.append(i)
        batches = self._batches(requests, todo, lengths)
        show = self.progress if self.progress is not None else len(batches) > 4
        for batch in tqdm(batches, desc=f"oracle {Path(self.model).name}", unit="batch", disable=not show):
            try:
                answers = self._generate([prompts[i] for i in batch], requests[batch[0]])
            except Exception as err:  # noqa: BLE001 - isolate the failing row(s)
                if len(batch) > 1:
                    logger.debug("batch failed (%s); retrying its rows one by one", err)
                    answers = [None] * len(batch)
                else:
                    answers = [ChatResult.failure(f"generation failed: {type(err).__name__}: {err}")]
            for i, answer in zip(batch, answers):
                if answer is None:
                    try:
                        answer = self._generate([prompts[i]], requests[i])[0]
                    except Exception as err:  # noqa: BLE001
                        answer = ChatResult.failure(f"generation failed: {type(err).__name__}: {err}")
                finish(i, answer)
        return results

    def _batches(self, requests: list[ChatRequest], todo: list[int], lengths: list[int]) -> list[list[int]]:
        """Rows with the same sampling settings, longest first, in chunks of `batch_size`."""
        def setting(i: int):
            r = requests[i]
            greedy = r.temperature == 0
            return (greedy, 0.0 if greedy else r.temperature, 1.0 if greedy else r.top_p, r.max_tokens, r.n,
                    r.logprobs, r.top_logprobs or 0, -1 if (greedy or r.seed is None) else r.seed)

        batches = []
        for key, group in groupby(sorted(todo, key=lambda i: (setting(i), -lengths[i])), key=setting):
            rows = list(group)
            size = 1 if key[-1] != -1 else max(1, self.batch_size // (1 if key[0] else key[4]))
            batches += [rows[k:k + size] for k in range(0, len(rows), size)]
        return batches

    def _generate(self, prompts: list[str], request: ChatRequest) -> list[ChatResult]:
        """Generate for prompts sharing `request`'s sampling settings."""
        import torch

        model, tokenizer = self._load()
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = inputs.to(model.device)
        greedy = request.temperature == 0
        copies = 1 if greedy else request.n
        kwargs = dict(max_new_tokens=request.max_tokens, do_sample=not greedy, num_return_sequences=copies,
                      pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                      output_logits=request.logprobs)
        if not greedy:
            kwargs.update(temperature=request.temperature, top_p=request.top_p, top_k=0)
        seeded = request.seed is not None and not greedy
        # A seed applies to this call only: the global random state is restored afterwards.
        rng = torch.random.fork_rng(devices=[] if model.device.type == "cpu" else None) if seeded else nullcontext()
        with torch.inference_mode(), rng:
            if seeded:
                torch.manual_seed(request.seed)
            out = model.generate(**inputs, **kwargs)
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
        generated = out.sequences[:, inputs["input_ids"].shape[1]:].tolist()
        steps = torch.stack(out.logits, dim=1).float().log_softmax(-1) if request.logprobs else None
        results = []
        for p in range(len(prompts)):
            texts, reasons, logprobs, completion = [], [], [], 0
            for c in range(copies):
                row = p * copies + c
                ids = generated[row]
                stop = next((k for k, t in enumerate(ids) if t in eos), None)
                ids = ids[:stop] if stop is not None else ids
                texts.append(tokenizer.decode(ids, skip_special_tokens=True))
                reasons.append("stop" if stop is not None else "length")
                completion += len(ids)
                if steps is not None:
                    logprobs.append(self._token_logprobs(tokenizer, steps[row], ids, request.top_logprobs or 0))
            if greedy and request.n > 1:
                texts, reasons, logprobs = texts * request.n, reasons * request.n, logprobs * request.n
                completion *= request.n
            prompt_tokens = int(inputs["attention_mask"][p].sum())
            results.append(ChatResult(texts=texts, finish_reasons=reasons,
                                      logprobs=logprobs if request.logprobs else None,
                                      usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                             "total_tokens": prompt_tokens + completion}))
        return results

    @staticmethod
    def _token_logprobs(tokenizer, step_logprobs, ids: list[int], top: int) -> list[dict]:
        entries = []
        for k, token_id in enumerate(ids):
            dist = step_logprobs[k]
            alternatives = []
            if top:
                values, indices = dist.topk(top)
                alternatives = [{"token": tokenizer.decode([int(i)]), "logprob": float(v)}
                                for v, i in zip(values, indices)]
            entries.append({"token": tokenizer.decode([token_id]), "logprob": float(dist[token_id]),
                            "top_logprobs": alternatives})
        return entries
