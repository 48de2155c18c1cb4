"""IFD and r-IFD: the student model's four losses per row, batched and exact (REFERENCE.md §6).

`IFDScorer` is a callable for `Dataset.map(batched=True)`. For each row it builds the four texts
of the method's reference script (`selection_code/data_analysis.py`), with the same
tokenization, right truncation and target boundaries, and computes:

- `ins_alone`: mean loss of `instruction + input` on its own (every token but the first);
- `out_alone`: mean loss of `output` on its own;
- `ins_condition`: loss of `instruction + input` after the reverse prompt built from `output`;
- `out_condition`: loss of `output` after the scoring template filled with the instruction.

Unlike the reference (batch size 1, four full forward passes per row), all 4×N sequences of a
map batch are sorted by length and packed into micro-batches of at most `max_tokens_per_batch`
padded tokens; the language-model head runs only at the scored positions, in chunks, so no
`[batch, seq, vocab]` logits tensor is ever built. Right padding with an attention mask keeps
every row's scores independent of the batch it lands in. A span (token ids and first scored
token) already scored by this scorer in this process is not scored again: the recycle job's four
splits share most texts (the original instruction of `reflect_response`, every row a reflection
left unchanged), so the later splits reuse the earlier ones' losses (`reused_spans` counts them).

Undefined values are NaN, never 0, and `score_status` says why: `ok`, or `;`-joined reasons
among `invalid_text` (a text is not valid UTF-8: a lone surrogate), `empty_instruction`
(instruction and input empty or blank), `empty_output` (empty or blank), `no_scored_token:<loss>`
(nothing left to score after truncation), `non_finite:<loss>`, `non_positive:<loss>` (a mean
loss <= 0: its ratio would be 0 or undefined) and `error:<Type>: <message>` (the row raised;
other rows go on).

`datasets` returns a 0-row dataset from `map` without calling the scorer, so it gets no score
column and a later selection reports them missing; `map_scores(data, scorer)` is the same `map`
(on a `Dataset` or a `DatasetDict`) that gives 0-row splits the typed columns too.

Example:
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.scoring.ifd import IFDScorer
    >>> ds = load_sample().select(range(4))
    >>> scored = ds.map(IFDScorer(template="vicuna"), batched=True, batch_size=4)
    >>> sorted(c for c in scored.column_names if c.startswith("ifd"))
    ['ifd', 'ifd_loss']
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from array import array
from pathlib import Path
from typing import Optional

from ..data import batch_size_of, require_columns, text_column
from ..models import default_device, load_causal_lm, load_tokenizer, model_identity, torch_dtype  # noqa: F401
from ..prompts import NO_SEPARATOR, get_scoring_template, join_input, reverse_prompt
from ..reflection.row_checks import is_valid_text
from ..utils import LazyState, package_version, stable_hash, torch_threads
from .engine import Span, check_model, mean_loss, mean_token_losses
from .ifd_math import LOSS_NAMES, SCORE_COLUMNS, SCORE_FEATURES, score_columns  # noqa: F401  (public here too)
from .served import StudentServer
from .spans import response_span, truncate_ids
from .served_parse import ServedProblem, request_failed_rows

logger = logging.getLogger(__name__)

# Bump when the loss computation changes, so datasets' cache does not serve stale scores.
SCORING_VERSION = 3  # 2: the r-IFD target is the whole `instruction + input`; 3: `empty_instruction`, exp ratios
GPU_TOKENS_PER_BATCH = 16384  # default padded tokens per forward pass on a GPU
CPU_TOKENS_PER_BATCH = 1024  # and on CPU: bigger micro-batches are slower there (cache misses, attention)
MEMO_SPANS = 500_000  # losses kept for reuse (a 16-byte key and a float each); cleared when full


def _row_texts(instruction: str, input: str, output: str, template) -> dict:
    """The reference script's texts for one row; `*_prefix` is the text before the target.

    The r-IFD target is the whole `instruction + input` after the reverse prompt (REFERENCE.md
    §6). The reference script starts it at the *last* occurrence of the instruction, which, when
    the input repeats the instruction, or the instruction is empty, leaves part or all of the
    target unscored; for every other row both give the same boundary."""
    prompt = template.format(instruction, input)
    reverse = template.no_input.format(instruction=reverse_prompt(output))
    ins = join_input(instruction, input, NO_SEPARATOR)
    whole_reverse = reverse + ins
    whole = prompt + output
    return {
        "prompt": prompt, "reverse": reverse, "ins": ins, "out": output,
        "whole_reverse": whole_reverse, "reverse_prefix": reverse,
        "whole": whole, "prefix": whole[: whole.rfind(output)],
    }


def pick_device(device: Optional[str], rank: Optional[int]) -> str:
    """`device` if given; else GPU `rank` mod the GPU count for a `map(with_rank=True)` worker,
    CUDA for a plain call, or CPU when there is no GPU.

    Example:
        >>> from reflectune_hf.scoring.ifd import pick_device
        >>> pick_device("cpu", rank=3)
        'cpu'
    """
    import torch

    if device is None and rank is not None and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return default_device(device)


def _worker_count() -> int:
    """How many processes forked from our parent (datasets' `num_proc` pool workers, plus its queue
    manager) share this machine's cores; 1 when that cannot be read (not Linux)."""
    try:
        me = Path("/proc/self/cmdline").read_bytes()
        parent = os.getppid()
        siblings = set()
        for task in os.listdir(f"/proc/{parent}/task"):
            siblings.update(Path(f"/proc/{parent}/task/{task}/children").read_text().split())
        return max(1, sum(1 for pid in siblings if Path(f"/proc/{pid}/cmdline").read_bytes() == me))
    except OSError:
        return 1


class IFDScorer(LazyState):
    """Add the four losses, their perplexities, IFD and r-IFD to a batch of Alpaca rows.

    Input columns: `instruction`, `output` (str), optional `input` (str; absent means `""`).
    Output columns: `loss_ins_alone`, `loss_out_alone`, `loss_ins_condition`,
    `loss_out_condition`, `ppl_*` of each (`exp(loss)`), `ifd` = ppl_out_condition /
    ppl_out_alone and `rifd` = ppl_ins_condition / ppl_ins_alone (ppl ratios, as the V2 code),
    `ifd_loss` and `rifd_loss` (the same ratios of losses, as Cherry LLM), all float, NaN where
    undefined; `score_status` (str), `"ok"` or the reasons a value is NaN. Map it with
    `map_scores(data, scorer)` for a 0-row split to get these columns too (`output_features`).

    Args:
        model: embedded alias, local directory or Hub id of a causal LM (loaded on first call).
        template: scoring template, `"vicuna"`, `"alpaca"`, `"wizardlm"` or `"plain"`.
        max_length: the reference's `max_length` (right truncation, per-quantity limits); at most
            the model's context (`max_position_embeddings`), checked when it loads.
        dtype: `"float32"` (exact), `"bfloat16"` or `"float16"`.
        device: `"cpu"`, `"cuda"`, `"cuda:1"`...; default: with `with_rank=True` rank r takes GPU
            r mod the GPU count, else CUDA when present, else CPU.
        max_tokens_per_batch: padded tokens per forward pass (rows × longest row); default
            16384 on a GPU and 1024 on CPU, where larger micro-batches only add memory traffic
            (measured on 2 cores: 1024 tokens 0.8 s/row, 16384 tokens 1.8 s/row, SmolLM2-135M).
        num_threads: torch CPU threads while the losses are computed (default: torch's; under
            `map(num_proc=N, with_rank=True)` the cores split between the workers). Set around each
            call and restored after it: the process's thread count is never changed for good.
        base_url: score with a served student instead (`scoring.served`: vLLM, llama.cpp): only
            the tokenizer of `model` is loaded here, each text is tokenised as above and the
            server returns the log-probabilities the four losses are computed from (same spans,
            statuses and ratios; a span the server's answer cannot be aligned with gets
            `misaligned:<loss>`, a request that failed after its retries `error:...`).
        server_model: the model's name on the server (default: `model`).
        student_backend: `"auto"` (recognise the server), `"vllm"`, `"llamacpp"` or `"echo"`.
        max_concurrency, timeout, max_retries, cache: the served student's requests in flight,
            seconds per attempt, retries, and answer cache (`scoring.served.StudentServer`).

    The datasets fingerprint is the pickled configuration (model, template, max_length, dtype)
    plus `model_identity(model)` and the package and scoring versions: a repeated `map` is
    served from the cache without loading the model, and new weights or a new version score
    again. `device`, `num_threads` and `max_tokens_per_batch` change the speed, not the scores,
    so they are not part of it (nor of the pickled state): changing them reuses the cache. Under
    `map(num_proc=N, with_rank=True)` each worker loads its own copy and picks its own runtime
    settings (GPU by rank, CPU cores split between workers, the device's default budget). With
    `base_url`, the fingerprint holds the tokenizer's identity and the server (URL without
    credentials, `server_model`, backend) instead of the weights and dtype; the served
    student's concurrency, timeout and retries are left out like `device`.

    Example:
        >>> from reflectune_hf import load_sample
        >>> from reflectune_hf.scoring.ifd import IFDScorer
        >>> scorer = IFDScorer(max_length=512)
        >>> row = scorer({"instruction": ["Name a colour."], "output": ["Blue."]})
        >>> row["score_status"], row["ifd"][0] > 0
        (['ok'], True)
    """

    # Runtime knobs are transient too: they change the speed, never the scores (see above).
    _transient = ("_model", "_tokenizer", "_device", "_engine", "device", "num_threads",
                  "max_tokens_per_batch", "_memo", "reused_spans")
    _transient_defaults = {"reused_spans": 0}
    # The columns written and their types: the schema of a 0-row result (`map_scores`, `map_stage`).
    output_features = SCORE_FEATURES

    def __init__(self, model: str = "smollm2-135m-instruct", template: str = "vicuna", max_length: int = 2048,
                 dtype: str = "float32", device: Optional[str] = None, max_tokens_per_batch: Optional[int] = None,
                 num_threads: Optional[int] = None, base_url: Optional[str] = None,
                 server_model: Optional[str] = None, student_backend: str = "auto", max_concurrency: int = 16,
                 timeout: float = 300.0, max_retries: int = 6, cache=True):
        self._template = get_scoring_template(template)  # raises on an unknown template
        torch_dtype(dtype)  # raises on an unknown dtype
        if max_length < 2 or (max_tokens_per_batch is not None and max_tokens_per_batch < 1):
            raise ValueError("max_length must be >= 2 and max_tokens_per_batch >= 1")
        self.model, self.template, self.max_length, self.dtype = str(model), template, int(max_length), str(dtype)
        self.device, self.num_threads = device, num_threads
        self.max_tokens_per_batch = None if max_tokens_per_batch is None else int(max_tokens_per_batch)
        self.server = None if not base_url else StudentServer(
            base_url, server_model or self.model, student_backend, max_concurrency, timeout, max_retries, cache)
        identity = {"model": model_identity(self.model), "dtype": self.dtype}
        if self.server is not None:  # the server's weights and precision; the local tokenizer
            identity = {"tokenizer": model_identity(self.model), "server": self.server.identity()}
        self.fingerprint = stable_hash({
            **identity, "template": template, "max_length": self.max_length,
            "version": package_version(), "scoring": SCORING_VERSION,
        })
        self._model = self._tokenizer = self._device = self._engine = self._memo = None
        self.reused_spans = 0  # spans not scored again: their loss was known (class docstring)

    def __repr__(self) -> str:
        served = f", server={self.server!r}" if self.server is not None else ""
        return (f"IFDScorer(model={self.model!r}, template={self.template!r}, max_length={self.max_length}, "
                f"dtype={self.dtype!r}{served}, fingerprint={self.fingerprint!r})")

    # -- runtime ----------------------------------------------------------------------------

    def load(self, rank: Optional[int] = None) -> "IFDScorer":
        """Load the model now (it loads on the first call otherwise); `rank` picks the GPU."""
        if self.server is not None:  # served: the tokenizer only
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.model)
            return self
        if self._model is None:
            device = pick_device(self.device, rank)
            logger.info("IFDScorer loading %s (%s) on %s", self.model, self.dtype, device)
            model, tokenizer = load_causal_lm(self.model, dtype=self.dtype, device=device)
            context = getattr(model.config, "max_position_embeddings", None)
            if isinstance(context, int) and self.max_length > context:  # past it: garbage or an index error
                raise ValueError(f"IFDScorer: max_length={self.max_length} exceeds the context of {self.model!r} "
                                 f"({context} positions); set max_length <= {context}")
            self._model, self._tokenizer, self._device = model, tokenizer, device
            self._engine = check_model(self._model)  # the fast path where tested, else plain
        return self

    def _cpu_threads(self, rank: Optional[int]) -> Optional[int]:
        """Torch threads for the work on CPU: `num_threads`, or under `map(num_proc=N,
        with_rank=True)` the cores split between the workers; None (torch's own) otherwise."""
        if not str(self._device or "").startswith("cpu") or not (self.num_threads or rank is not None):
            return None
        return self.num_threads or max(1, len(os.sched_getaffinity(0)) // _worker_count())

    @property
    def token_budget(self) -> int:
        """Padded tokens per forward pass: `max_tokens_per_batch`, or the default of the device."""
        if self.max_tokens_per_batch is not None:
            return self.max_tokens_per_batch
        return GPU_TOKENS_PER_BATCH if str(self._device or "").startswith("cuda") else CPU_TOKENS_PER_BATCH

    def _encode(self, texts: list[str]) -> dict:
        unique = list(dict.fromkeys(texts))
        encoded = self._tokenizer(unique, add_special_tokens=True)["input_ids"] if unique else []
        return dict(zip(unique, encoded))

    def _row_spans(self, texts: dict, enc: dict) -> list[Span]:
        """The row's four spans: the two whole texts (every token but the first scored), then the
        two conditional ones by the one response rule (`spans.response_span`: target after prefix)."""
        tok, max_length = self._tokenizer, self.max_length
        prompt_len = min(len(enc[texts["prompt"]]), max_length)
        reverse_len = min(len(enc[texts["reverse"]]), max_length)
        limits = (max_length - reverse_len + 1, max_length - prompt_len + 1)
        spans = [Span(truncate_ids(tok, texts[name], enc[texts[name]], limit), 1, group=kind, text=texts[name])
                 for kind, (name, limit) in enumerate(zip(("ins", "out"), limits))]
        for kind, (whole, prefix) in enumerate((("whole_reverse", "reverse_prefix"), ("whole", "prefix")), start=2):
            target = texts[whole][len(texts[prefix]):]
            spans.append(response_span(tok, texts[prefix], target, max_length, group=kind, encoded=enc))
        return spans

    def score(self, instructions: list[str], inputs: list[str], outputs: list[str], rank: Optional[int] = None) -> dict:
        """The score columns (see the class docstring) for parallel lists of strings."""
        n = len(outputs)
        losses = [[math.nan] * 4 for _ in range(n)]
        reasons: list[list[str]] = [[] for _ in range(n)]
        for i in range(n):  # a blank instruction or response is none (SelectIT's statuses)
            if not all(is_valid_text(t) for t in (instructions[i], inputs[i], outputs[i])):
                reasons[i].append("invalid_text")  # a lone surrogate: no tokenizer reads it
                continue
            if not (instructions[i] + inputs[i]).strip():
                reasons[i].append("empty_instruction")
            if not outputs[i].strip():
                reasons[i].append("empty_output")
        todo = [i for i in range(n) if not reasons[i]]
        if todo:
            self.load(rank)
            texts = {i: _row_texts(instructions[i], inputs[i], outputs[i], self._template) for i in todo}
            enc = self._encode([t for i in todo for t in texts[i].values()])
            spans, where = [], []  # where: (row, kind) of each span
            for i in todo:
                try:
                    row_spans = self._row_spans(texts[i], enc)
                except Exception as exc:  # noqa: BLE001 - recorded on the row
                    reasons[i].append(f"error:{type(exc).__name__}: {exc}")
                    continue
                for kind, span in enumerate(row_spans):
                    if span.n_scored > 0:
                        spans.append(span)
                        where.append((i, kind))
                    else:
                        reasons[i].append(f"no_scored_token:{LOSS_NAMES[kind]}")
            values = self._span_losses(spans, rank)
            for (i, kind), value in zip(where, values):
                if isinstance(value, ServedProblem):
                    reasons[i].append(f"{value.status}:{LOSS_NAMES[kind]}")
                elif isinstance(value, Exception):
                    reasons[i].append(f"error:{type(value).__name__}: {value}")
                elif not math.isfinite(value):
                    reasons[i].append(f"non_finite:{LOSS_NAMES[kind]}")
                elif value <= 0:  # a ratio's 0 or 0/0: not a score (a served student's logprobs of 0)
                    reasons[i].append(f"non_positive:{LOSS_NAMES[kind]}")
                else:
                    losses[i][kind] = value
        return score_columns(losses, reasons)

    def _span_losses(self, spans: list[Span], rank: Optional[int]) -> list:
        """The mean loss of each span (or the exception standing for it): reused when this scorer
        already scored the same span, else from the local engine or from the served student's
        log-probabilities through the same `mean_loss` math. Only finite losses are kept."""
        if self._memo is None:
            self._memo = {}
        keys = [_span_key(span) for span in spans]
        first = {}  # key -> index of its first span not in the memo (duplicates in a call: once)
        for i, key in enumerate(keys):
            if key not in self._memo:
                first.setdefault(key, i)
        self.reused_spans += len(spans) - len(first)
        losses = {key: self._memo[key] for key in keys if key not in first}  # before a clear below
        fresh = dict(zip(first, self._new_losses([spans[i] for i in first.values()], rank))) if first else {}
        if len(self._memo) + len(fresh) > MEMO_SPANS:
            self._memo.clear()
        for key, value in fresh.items():
            if isinstance(value, float) and math.isfinite(value):
                self._memo[key] = value
        losses.update(fresh)
        return [losses[key] for key in keys]

    def _new_losses(self, spans: list[Span], rank: Optional[int]) -> list:
        if self.server is not None:
            return [v if isinstance(v, Exception) else mean_loss(v)
                    for v in self.server.span_logprobs(self._tokenizer, spans)]
        with torch_threads(self._cpu_threads(rank)):
            return mean_token_losses(self._model, spans, self._tokenizer.pad_token_id, self.token_budget,
                                     **self._engine.kwargs())

    def failed_rows(self, dataset) -> list[int]:
        """Rows of a scored `dataset` whose served request failed: `map_scores` scores them again."""
        return request_failed_rows(dataset, "score_status")

    def __call__(self, batch: dict, rank: Optional[int] = None) -> dict:
        require_columns(batch, ["instruction", "output"], "IFDScorer")
        single = isinstance(batch["output"], str) or batch["output"] is None
        if single:  # map without batched=True
            batch = {k: [v] for k, v in batch.items()}
        n = batch_size_of(batch)
        inputs = text_column(batch, "input", "IFDScorer") if "input" in batch else [""] * n
        result = self.score(text_column(batch, "instruction", "IFDScorer"), inputs,
                            text_column(batch, "output", "IFDScorer"), rank=rank)
        return {k: v[0] for k, v in result.items()} if single else result


def _span_key(span: Span) -> bytes:
    """What a span's loss depends on (its tokens and first scored token), hashed to 16 bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(span.start.to_bytes(4, "little"))
    digest.update(array("q", span.ids).tobytes())
    return digest.digest()


def map_scores(data, scorer, **map_kwargs):
    """`data.map(scorer, batched=True, **map_kwargs)` on a `Dataset` or `DatasetDict`, where a 0-row
    split gets the scorer's columns too (`scorer.output_features`, typed, 0 rows): `datasets`
    returns a 0-row dataset from `map` without calling the scorer, so a plain `map` leaves it
    without them and a later selection (`select_v2`, `top_k_by`) finds them missing. Rows whose
    served request failed (`scorer.failed_rows`) are scored again when the datasets cache replays
    them (`oracles.rerun.map_stage`; the served answers that came are in the student's cache).

    Args:
        data: a `Dataset` or `DatasetDict` (an `IterableDataset` gets a plain lazy `map`).
        scorer: `IFDScorer`, `SelectITScorer`, or any callable with `output_features`.
        **map_kwargs: passed to `map` (`batched=True` unless given; `batch_size`, `desc`, ...).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.scoring.ifd import IFDScorer, map_scores
        >>> empty = Dataset.from_dict({"instruction": [], "output": []})
        >>> scored = map_scores(empty, IFDScorer())  # loads no model
        >>> scored.num_rows, scored.column_names[-3:], scored.features["ifd"]
        (0, ['ifd_loss', 'rifd_loss', 'score_status'], Value('float64'))
    """
    from datasets import DatasetDict

    from ..oracles.rerun import map_stage

    if isinstance(data, DatasetDict):
        return DatasetDict({name: map_scores(split, scorer, **map_kwargs) for name, split in data.items()})
    return map_stage(data, scorer, **map_kwargs)  # a 0-row split: `scorer.output_features`
