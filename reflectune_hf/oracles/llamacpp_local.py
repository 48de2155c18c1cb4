"""`LlamaCppOracle`: the embedded GGUF as the oracle, in this process, through llama.cpp (no server).

Requests are decoded together by llama.cpp's batched API (`llama_batch` with one sequence id
per running request, `llama_decode`, `llama_get_logits_ith`): every step carries the next token
of each running sequence plus prompt tokens of newly admitted ones (up to `n_batch`), a finished
sequence's KV cells are removed at once and its slot is refilled from the queue (continuous
batching over `batch_size` slots). Each sequence has its own KV stream of `n_ctx` cells, so
attention costs what its own context costs. Each request is reported - cached, counted, and
advancing the progress bar - the moment it ends.

Weights: `weights="f16"` (the default) runs the embedded GGUF re-encoded once as F16 (written
next to the oracle cache, `cache_root()/gguf`, in about 2 s): the Q4_1 values are exact in fp32
and within fp16 rounding here, and on an AVX2 CPU without AVX-512 llama.cpp prefills F16 2.4x
faster than Q4_1 (measured: 512 prompt tokens in 2.4 s against 6 s on one core) and decodes a
little faster. `weights="gguf"` runs the file as it is.

The prompt text is the HF tokenizer's chat template (the same text and token ids as
`TransformersOracle`; llama.cpp's own tokenizer splits " \\n" differently, so the HF tokenizer
tokenises and llama.cpp only decodes). Temperature 0 is greedy; otherwise the logits are divided
by the temperature, nucleus-filtered by `top_p` and sampled by numpy from a generator per
request (`seed` given: its own draws whatever the batch neighbours). `n` sampled choices are
`n` sequences (each prefilled; greedy gives one choice repeated). Logprobs are the model's own
(before temperature and the format mask), with `top_logprobs` alternatives. A request with an
`answer_format` is decoded under its regex through llguidance, the token masks of all
constrained sequences of a step filled in one parallel call (`LLExecutor`).

Budget per request: `min(max_tokens, max_new_tokens, n_ctx - prompt_tokens)`; a prompt that
fills `n_ctx` fails its row ("raise n_ctx or shorten the row"). Threads: `n_threads` per
instance (default `default_threads()`: the usable cores that other processes leave free when the
model loads, measured over a quarter second, at least 1 - llama.cpp's threads spin while they
wait, so on a busy 2-core machine one thread is several times faster than two, while an idle one
wants both).

A prompt is prefilled once per engine: its KV cells and last logits are kept in host memory
(`prompt_cache_mb`, 512 by default), so a stage's re-ask, which sends the same prompt with
another seed and budget, starts decoding at once (measured on the quickstart's compression and
reflection of 40 rows: the tokens through llama.cpp 44,754 -> 23,038; on 16 rows, runs
interleaved, 109 s -> 89 s).

Each sequence attends to its own KV stream, but llama.cpp's kernels split a step's work by the
tokens it carries, so logits differ slightly with the schedule (a prompt's last token decoded
alone came out up to 0.04 off the same token inside its prefill). Greedy answers stay the same
unless two tokens nearly tie (the tests' greedy answers do, whatever shares their batch, and all
91 greedy answers of the 40-row run did when re-asks stopped being prefilled); an answer sampled
at a high temperature may take another turn (35 of that run's 85 sampled re-asks changed text;
every status stayed the same).

Example:
    >>> from reflectune_hf.oracles import ChatRequest
    >>> from reflectune_hf.oracles.llamacpp_local import LlamaCppOracle
    >>> oracle = LlamaCppOracle(max_new_tokens=8, cache=False)
    >>> result = oracle.complete([ChatRequest([{"role": "user", "content": "Say hi."}])])[0]
    >>> result.ok and result.finish_reasons[0] in ("stop", "length")
    True
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterator, Optional

from ..models import EMBEDDED_MODELS, gguf_path, load_tokenizer, model_identity, resolve_model
from ..utils import cache_root
from .base import ChatRequest, ChatResult, OracleConfigurationError
from .cache import CachingOracle
from .cpu_threads import default_threads
from .llamacpp_engine import LlamaEngine, Sequence, StepTimes, run_sequences
from .llamacpp_logs import quiet_c_output, route_llama_logs

logger = logging.getLogger(__name__)

# Part of every cache key: raised when the engine's decoding changes what an answer is (2: it stops on
# every end-of-generation token), so answers cached by an earlier engine are asked again.
DECODING_REVISION = 2

WEIGHTS = ("f16", "gguf")


def llamacpp_available() -> bool:
    """Whether llama-cpp-python imports here (the `server` extra)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build counts as missing
        return False
    return True


def is_gguf_model(model: str) -> bool:
    """An embedded alias (a GGUF in an installed package) or a path to a `.gguf` file."""
    return str(model) in EMBEDDED_MODELS or str(model).lower().endswith(".gguf")


def source_gguf(model: str) -> Path:
    """The GGUF file of `model` (an embedded alias or a `.gguf` path)."""
    if str(model) in EMBEDDED_MODELS:
        return gguf_path(str(model))
    path = Path(model).expanduser()
    if not path.is_file():
        raise OracleConfigurationError(f"No GGUF file at {model!r}: pass an embedded alias "
                                       f"({', '.join(sorted(EMBEDDED_MODELS))}) or a path to a .gguf file")
    return path


def f16_gguf(source: Path) -> Path:
    """`source` re-encoded as F16 (once, under `cache_root()/gguf`; a crash never leaves a partial file).

    The file is named by the source's size and content digest, so a reinstalled package (new
    mtimes, same bytes) finds it again; writing one removes the earlier re-encodes of a source of
    the same name and size (each is ~270 MB for the embedded 135M model)."""
    import ctypes

    import llama_cpp

    size = source.stat().st_size
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    target = cache_root() / "gguf" / f"{source.stem}-{size}-{digest.hexdigest()[:16]}.f16.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True, 1
    logger.info("Re-encoding %s as F16 for llama.cpp (once): %s", source.name, target)
    route_llama_logs(llama_cpp)  # llama-cpp-python's own callback prints to sys.stderr, past the descriptors
    with quiet_c_output() as output:  # llama.cpp prints a line per tensor: shown only if it fails
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
    if failed:
        partial.unlink(missing_ok=True)
        raise OracleConfigurationError(f"llama.cpp could not re-encode {source} as F16 ({output.tail() or 'no output'})"
                                       ": use weights='gguf'")
    os.replace(partial, target)
    for earlier in target.parent.glob(f"{glob.escape(source.stem)}-{size}-*.f16.gguf"):
        if earlier != target:
            earlier.unlink(missing_ok=True)
    return target


class LlamaCppOracle(CachingOracle):
    """Batched in-process generation with llama.cpp on a GGUF model.

    Args:
        model: an embedded alias (default "smollm2-135m-instruct") or a path to a `.gguf` file
            (its tokenizer and chat template are read from the GGUF by transformers).
        batch_size: sequences decoded together (llama.cpp `n_seq_max`).
        max_new_tokens: caps every answer (with the request's `max_tokens`, the smaller wins).
        n_ctx: context of each sequence (prompt + answer), at most the model's training context.
        n_threads: llama.cpp threads; default `default_threads()` (the free usable cores, at
            least 1). Not part of the cache key or the fingerprint (it changes speed, not answers).
        prompt_cache_mb: host memory for prefilled prompts (default 512; 0 keeps none): a
            request whose prompt was decoded before on this engine (a stage's re-ask) starts
            from its KV cells instead of a new prefill. Speed only, like `n_threads`.
        weights: "f16" (default; the GGUF re-encoded once as F16) or "gguf" (the file as is).
        cache: True (default cache file), False, a path or an `OracleCache`.
        progress: a tqdm bar advancing per request; None shows it for more than one request.
        structured: "auto"/"on": enforce each request's `answer_format` (llguidance; "on"
            raises where it is missing, "auto" logs it and answers in free text); "off": ignore.

    The model loads on first use in each process; pickling keeps the configuration only
    (`batch_size`, `n_threads`, `prompt_cache_mb` and `progress` change speed, not answers: they
    are outside the datasets fingerprint and `num_proc` workers use their defaults).
    """

    _transient: ClassVar[tuple[str, ...]] = CachingOracle._transient + (
        "_engine", "_tokenizer", "_identity_cache", "_constraints", "n_threads", "prompt_cache_mb", "batch_size",
        "progress")
    _transient_defaults: ClassVar[dict] = {"n_threads": None, "prompt_cache_mb": 512, "batch_size": 16}

    def __init__(self, model: str = "smollm2-135m-instruct", batch_size: int = 16, max_new_tokens: int = 512,
                 n_ctx: int = 2048, n_threads: Optional[int] = None, weights: str = "f16", cache=True,
                 progress: Optional[bool] = None, structured: str = "auto", prompt_cache_mb: float = 512):
        if batch_size < 1 or max_new_tokens < 1 or n_ctx < 16 or prompt_cache_mb < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1, n_ctx >= 16, prompt_cache_mb >= 0")
        if n_threads is not None and n_threads < 1:
            raise ValueError(f"n_threads must be >= 1 or None, got {n_threads}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        structured = {True: "on", False: "off"}.get(structured, structured)
        if structured not in ("auto", "on", "off"):
            raise ValueError(f"structured must be 'auto', 'on' or 'off', got {structured!r}")
        self.model, self.batch_size, self.max_new_tokens = str(model), int(batch_size), int(max_new_tokens)
        self.n_ctx, self.n_threads, self.weights = int(n_ctx), n_threads, weights
        self.prompt_cache_mb = prompt_cache_mb
        self.cache, self.progress, self.structured = cache, progress, structured

    def __repr__(self) -> str:
        return f"LlamaCppOracle(model={self.model!r}, weights={self.weights!r}, batch_size={self.batch_size})"

    def _gguf_identity(self) -> dict:
        if self.model in EMBEDDED_MODELS:
            ident = dict(model_identity(self.model))
            ident.pop("conversion", None)  # the safetensors conversion is not used here
        else:
            path = source_gguf(self.model).resolve()
            ident = {"gguf": str(path), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
        return {"engine": "llamacpp", "weights": self.weights, **ident}

    def _identity(self) -> tuple[str, str]:
        """The cache key's model: the GGUF file's identity, the weights' encoding, the engine and its
        `DECODING_REVISION`, and `n_ctx` (it caps the budget of a long prompt's answer: a smaller
        context, a shorter answer)."""
        if getattr(self, "_identity_cache", None) is None:
            try:
                ident = self._gguf_identity()
            except OracleConfigurationError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to find the model is a configuration error
                raise OracleConfigurationError(f"Cannot find the model {self.model!r}: {err}") from err
            name = ident.get("package") or f"{ident.get('gguf')}@{ident.get('size')}-{ident.get('mtime_ns')}"
            self._identity_cache = f"llamacpp{DECODING_REVISION}:{self.model}:{name}:{self.weights}:ctx{self.n_ctx}"
        return self._identity_cache, "local"

    def fingerprint_identity(self) -> dict:
        """The package version, the engine, its `DECODING_REVISION` (as in the cache key: answers
        decoded otherwise are not replayed) and the GGUF's identity (a new file: a new fingerprint)."""
        try:
            weights = self._gguf_identity()
        except Exception:  # noqa: BLE001 - pickling must not fail; a missing model fails when loaded
            weights = None
        return {**super().fingerprint_identity(), "weights": weights, "decoding": DECODING_REVISION}

    def _prepare(self, request: ChatRequest) -> ChatRequest:
        """The request as sent and keyed: budget `min(max_tokens, max_new_tokens)`, and no answer
        format when `structured="off"`."""
        from dataclasses import replace

        budget = self.max_new_tokens if request.max_tokens is None else min(request.max_tokens, self.max_new_tokens)
        changes = {"max_tokens": budget} if budget != request.max_tokens else {}
        if self.structured == "off" and request.answer_format is not None:
            changes["answer_format"] = None
        return replace(request, **changes) if changes else request

    def _load(self):
        if getattr(self, "_engine", None) is None:
            try:
                source = source_gguf(self.model)
                path = f16_gguf(source) if self.weights == "f16" else source
                if self.model in EMBEDDED_MODELS:
                    tokenizer = load_tokenizer(resolve_model(self.model))
                else:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
            except (OSError, ValueError) as err:
                raise OracleConfigurationError(f"Cannot load the model {self.model!r}: {err}") from err
            if getattr(tokenizer, "chat_template", None) is None:
                raise OracleConfigurationError(f"The tokenizer of {self.model!r} has no chat template")
            threads = self.n_threads or default_threads()
            engine = LlamaEngine(path, n_ctx=self.n_ctx, n_seq=self.batch_size, n_threads=threads,
                                 prompt_cache_mb=self.prompt_cache_mb)
            if engine.n_vocab < len(tokenizer):
                raise OracleConfigurationError(f"{self.model!r}: the GGUF has {engine.n_vocab} tokens, its "
                                               f"tokenizer {len(tokenizer)}: they do not belong together")
            self._engine, self._tokenizer = engine, tokenizer
        return self._engine, self._tokenizer

    def load(self) -> "LlamaCppOracle":
        """Load the model now (it loads on the first request otherwise): to time generation alone,
        or to fail early on a missing model. Returns the oracle."""
        self._load()
        return self

    @contextmanager
    def timed_steps(self) -> Iterator[StepTimes]:
        """Time every generation step inside the block by section (`StepTimes`: `llama_decode`,
        logits copies, llguidance's mask fill, mask application, choosing), for benchmarks. Loads
        the model; timing stops when the block ends.

        Example:
            >>> from reflectune_hf.oracles import ChatRequest
            >>> from reflectune_hf.oracles.llamacpp_local import LlamaCppOracle
            >>> oracle = LlamaCppOracle(max_new_tokens=4, cache=False, progress=False)
            >>> with oracle.timed_steps() as steps:
            ...     _ = oracle.complete([ChatRequest([{"role": "user", "content": "Hi"}])])
            >>> len(steps.steps) > 0
            True
        """
        engine, _ = self._load()
        engine.step_times = StepTimes()
        try:
            yield engine.step_times
        finally:
            engine.step_times = None

    def close(self) -> None:
        """Free the llama.cpp model and context now (they reload on next use)."""
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.close()
        self._engine = None

    def _constraint(self, request: ChatRequest, tokenizer):
        """The `LocalConstraint` enforcing `request.answer_format`, or None (plain text)."""
        from .local_decode import request_constraint

        return request_constraint(self.__dict__.setdefault("_constraints", {}), request, tokenizer, self.structured)

    def _send(self, requests: list[ChatRequest], on_result) -> list[ChatResult]:
        from tqdm.auto import tqdm

        from .local_decode import prompt_ids

        engine, tokenizer = self._load()
        ids = prompt_ids(tokenizer, requests)  # a str: the row's template error
        results: list[Optional[ChatResult]] = [None] * len(requests)
        show = self.progress if self.progress is not None else len(requests) > 1
        bar = tqdm(total=len(requests), desc=f"oracle {Path(self.model).name}", unit="req", disable=not show,
                   leave=False)
        eos = {tokenizer.eos_token_id, *engine.eog}  # the GGUF's EOS is one of its end-of-generation tokens
        parts: dict[int, list] = {}

        def finish(i: int, result: ChatResult) -> None:
            results[i] = result
            on_result(i, result)
            bar.update(1)

        def on_sequence(seq: Sequence) -> None:
            i, request = seq.request, requests[seq.request]
            copies = 1 if request.temperature == 0 else request.n
            parts.setdefault(i, [None] * copies)[seq.copy] = seq
            if any(s is None for s in parts[i]):
                return
            done = parts.pop(i)
            failed = next((s.error for s in done if s.error), None)
            if failed:
                return finish(i, ChatResult.failure(failed))
            texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in done]
            reasons = [s.reason for s in done]
            entries = [self._token_logprobs(tokenizer, s.logprobs) for s in done] if request.logprobs else None
            completion = sum(len(s.tokens) for s in done)
            if copies < request.n:  # greedy: one answer, repeated
                texts, reasons, completion = texts * request.n, reasons * request.n, completion * request.n
                entries = entries * request.n if entries is not None else None
            finish(i, ChatResult(texts=texts, finish_reasons=reasons, logprobs=entries,
                                 usage={"prompt_tokens": len(ids[i]), "completion_tokens": completion,
                                        "total_tokens": len(ids[i]) + completion}))

        sequences = []
        try:
            for i, request in enumerate(requests):
                if isinstance(ids[i], str):
                    finish(i, ChatResult.failure(ids[i]))
                    continue
                budget = min(request.max_tokens, engine.n_ctx - len(ids[i]))
                if budget < 1:
                    finish(i, ChatResult.failure(f"prompt of {len(ids[i])} tokens fills the context of {engine.n_ctx} "
                                                 f"tokens (no room for an answer): raise n_ctx or shorten the row"))
                    continue
                constraint = self._constraint(request, tokenizer)
                for c in range(1 if request.temperature == 0 else request.n):
                    sequences.append(Sequence(
                        request=i, copy=c, prompt=ids[i], budget=budget, temperature=request.temperature,
                        top_p=request.top_p, seed=None if request.seed is None else request.seed + c,
                        top_logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                        matcher=constraint.matcher() if constraint is not None else None))
            try:
                run_sequences(engine, sequences, eos=eos, on_done=on_sequence)
            except Exception as err:  # noqa: BLE001 - the unanswered rows fail, the answered ones stay
                logger.warning("llama.cpp decoding stopped: %s: %s", type(err).__name__, err)
                engine.reset()
                for i in range(len(requests)):
                    if results[i] is None:
                        finish(i, ChatResult.failure(f"generation failed: {type(err).__name__}: {err}"))
        finally:
            bar.close()
        for i, result in enumerate(results):
            if result is None:  # never reached: every sequence reports; kept so no row is ever dropped
                results[i] = ChatResult.failure("the llama.cpp oracle gave no answer")
        return results

    @staticmethod
    def _token_logprobs(tokenizer, steps) -> list[dict]:
        return [{"token": tokenizer.decode([token]), "logprob": float(logprob),
                 "top_logprobs": [{"token": tokenizer.decode([alt]), "logprob": float(value)} for alt, value in alts]}
                for token, logprob, alts in steps]
