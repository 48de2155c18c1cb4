"""The configurations of the `reflectune` jobs: dataclasses with the same field names in Python,
YAML files (`--config recipe.yaml`) and command-line flags (`--oracle_model` or `--oracle-model`),
read with TRL's `TrlParser`.

Every config checks its values when it is made, so a bad option fails before any oracle call
or model load, with a `ValueError` that names the option (the CLI turns it into exit code 2).

Example:
    >>> from reflectune_hf.cli.configs import RecycleConfig
    >>> RecycleConfig(oracle_model="gpt-4o-mini", selection="v2", top_fraction=0.05).ratio
    'ppl'
    >>> RecycleConfig(oracle_model="gpt-4o-mini", ratio="mean")
    Traceback (most recent call last):
    ...
    ValueError: ratio must be one of ['loss', 'ppl'], got 'mean'
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..models import DTYPE_NAMES
from ..oracles.backends import BACKENDS, check_choice, structured_mode
from ..oracles.factory import check_batch_conflict, check_local_conflict
from ..prompts import PROMPT_SETS, SCORING_TEMPLATES
from ..scoring.served import student_backend

logger = logging.getLogger(__name__)
SELECTIONS = ("v2", "v1", "none")
RATIOS = ("ppl", "loss")


def _help(text: str) -> dict:
    return {"help": text}


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def at_least(config, minimum, *names: str, optional: bool = False, strict: bool = False) -> None:
    """Raise `ValueError` naming the first of `config`'s fields `names` that is not a finite
    number >= `minimum` (> with `strict`; None passes when `optional`). A bool is not a number.

    Example:
        >>> from types import SimpleNamespace
        >>> at_least(SimpleNamespace(temperature=float("nan")), 0, "temperature")
        Traceback (most recent call last):
        ...
        ValueError: temperature must be a finite number >= 0, got nan
    """
    for name in names:
        value = getattr(config, name)
        if value is None and optional:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        finite = number and math.isfinite(value)
        if not finite or value < minimum or (strict and value == minimum):
            kind = "a finite number" if number and not finite else "a number"
            raise ValueError(f"{name} must be {kind} {'>' if strict else '>='} {minimum}, got {value!r}")


def integer_at_least(config, minimum: int, *names: str, optional: bool = False) -> None:
    """Raise `ValueError` naming the first of `config`'s fields `names` that is not an integer
    >= `minimum` (None passes when `optional`); a float (even 2.0) or a bool is not an integer.

    Example:
        >>> from types import SimpleNamespace
        >>> integer_at_least(SimpleNamespace(limit=1.5), 1, "limit")
        Traceback (most recent call last):
        ...
        ValueError: limit must be an integer >= 1, got 1.5
    """
    for name in names:
        value = getattr(config, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _Checked:
    """Runs the `_check` of every config class in the hierarchy when a config is made, after a
    check that every `bool` field holds a bool (from Python, `compress="false"` would be true)."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in (bool, "bool") and not isinstance(value, bool):
                raise ValueError(f"{f.name} takes True or False, got {value!r}")
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("_check")
            if check is not None:
                check(self)


@dataclass
class InputConfig(_Checked):
    """Where the data comes from."""

    help_group = "data"
    data: str = field(default="sample", metadata=_help(
        "'sample' (the bundled 40 rows), a Hub dataset id, a JSON/JSONL/Parquet file, or a folder written by "
        "save_to_disk or by an earlier reflectune command"))
    split: str = field(default="train", metadata=_help(
        "split to read from a Hub id or a saved multi-split folder (score and select read every split of a "
        "folder unless score is given one here)"))
    limit: Optional[int] = field(default=None, metadata=_help("use only the first N rows"))

    def _check(self):
        if not isinstance(self.data, str) or not self.data.strip():
            raise ValueError(f"data must name a dataset, a file or a folder, got {self.data!r}")
        integer_at_least(self, 1, "limit", optional=True)


@dataclass
class HubConfig(_Checked):
    """Where results are pushed."""

    help_group = "output"
    negated_help = {"private": "make the pushed repo public"}
    push_to_hub: Optional[str] = field(default=None, metadata=_help("also push the result to this Hub dataset repo"))
    private: bool = field(default=True, metadata=_help("make the pushed repo private"))

    def _check(self):
        if self.push_to_hub:  # huggingface_hub's own rules, checked before the job rather than by its push after it
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError as err:
                raise ValueError(f"push_to_hub must be a Hub dataset repo id, 'namespace/name' or 'name': "
                                 f"{' '.join(str(err).split())}") from None


@dataclass
class OutputConfig(HubConfig):
    """Where results go, and what the card says."""

    output_dir: str = field(default="reflectune-output", metadata=_help("where data, card and plots are written"))
    license: Optional[str] = field(default=None, metadata=_help(
        "license of the source data for the card (default: the one the loaded dataset declares, if any)"))
    quality_report: bool = field(default=False, metadata=_help(
        "add data-quality statistics to the card: token lengths, perplexity, MiniLM instruction-response "
        "coherence (needs the `quality` extra: pip install 'reflectune_hf[quality]')"))

    def _check(self):
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"output_dir must name a folder, got {self.output_dir!r}")
        out = Path(self.output_dir)  # as save_local uses it
        blocking = next((p for p in (out, *out.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ValueError(f"output_dir {self.output_dir!r}: {blocking} is a file, not a folder; pick another "
                             "--output_dir or move the file")


@dataclass
class DataConfig(OutputConfig, InputConfig):
    """Where the data comes from and where results go."""

    def _check(self):
        _check_overlap(self.data, self.output_dir)


def _check_overlap(data: str, output_dir: str) -> None:
    """Refuse an output folder that would write over the data it reads, before the job runs
    (datasets would refuse only after it: "a dataset can't overwrite itself"): a `--data` folder
    equal to `--output_dir`, inside it, or containing it (reading a folder of files would then
    also read this run's outputs), or a `--data` file that is one this layout writes in it."""
    from ..publishing.outputs import OWNED

    source, out = Path(data).expanduser(), Path(output_dir)
    if not source.exists():
        return  # a Hub id, or the bundled sample
    source, out = source.resolve(), out.resolve()
    inside = source.is_relative_to(out)
    if source.is_dir() and (inside or out.is_relative_to(source)):
        where = "is" if source == out else ("is inside" if inside else "contains")
        raise ValueError(f"data {data!r} {where} output_dir {output_dir!r}: the run would write over the data it "
                         "reads; pick another --output_dir")
    if source.is_file() and inside and OWNED.fullmatch(source.relative_to(out).as_posix()):
        raise ValueError(f"data {data!r} is a file the run writes in output_dir {output_dir!r}; copy it elsewhere "
                         "or pick another --output_dir")


@dataclass
class PushSource(_Checked):
    """The folder `reflectune push` publishes."""

    help_group = "data"
    data: str = field(default="reflectune-output", metadata=_help("the folder an earlier reflectune command wrote"))

    def _check(self):  # a name that is no folder here was looked up as a Hub dataset
        if not isinstance(self.data, str) or not self.data.strip() or not Path(self.data).expanduser().is_dir():
            raise ValueError(f"push --data {self.data!r}: no such folder; push publishes the --output_dir folder "
                             "an earlier reflectune command wrote")


@dataclass
class PushConfig(HubConfig, PushSource):
    """`reflectune push`: an output folder to the Hub, with its card."""

    def _check(self):
        if not self.push_to_hub:
            raise ValueError("push needs --push_to_hub <namespace/name>")


@dataclass
class OracleRequestConfig(_Checked):
    """The oracle LLM that compresses and reflects, and what is asked of it: everything that
    shapes a request and its cache key (what `reflectune estimate` counts), nothing of how
    requests are sent."""

    help_group = "oracle"
    negated_help = {"compress": "keep the inputs as they are: no compression"}
    oracle_model: Optional[str] = field(default=None, metadata=_help(
        "model name on an OpenAI-compatible server (OPENAI_API_KEY, --base_url), or local:<model> for a "
        "model run in this process (e.g. local:smollm2-135m-instruct; engine: --local_engine)"))
    base_url: Optional[str] = field(default=None, metadata=_help(
        "OpenAI-compatible server (vLLM, TGI, Ollama, llama.cpp); default OPENAI_BASE_URL or api.openai.com"))
    context_window: Optional[int] = field(default=None, metadata=_help(
        "context length of the server's model: each request's completion budget becomes min(max_new_tokens, "
        "context_window - prompt tokens) and a prompt that does not fit fails its row without being sent"))
    context_tokenizer: Optional[str] = field(default=None, metadata=_help(
        "tokenizer (Hub id, path or embedded alias) that counts prompt tokens for --context_window; default: an "
        "over-estimate from the text's size"))
    local_engine: str = field(default="auto", metadata=_help(
        "engine of a local: oracle: auto (llama.cpp in-process for an embedded GGUF model when llama-cpp-python is "
        "installed, else transformers), llamacpp or transformers"))
    max_new_tokens: int = field(default=2048, metadata=_help("completion budget per oracle request"))
    temperature: float = field(default=0.0, metadata=_help("sampling temperature of the first request"))
    prompt_set: str = field(default="paper", metadata=_help("'paper' (byte-identical to the method) or 'clean'"))
    compress: bool = field(default=True, metadata=_help("fold inputs into instructions first (stage 0)"))
    structured: str = field(default="auto", metadata=_help(
        "answer format enforced by the oracle: auto (where the backend can: llama.cpp grammar, vLLM regex, "
        "OpenAI JSON schema; free text elsewhere), on (fail where it cannot) or off"))

    def _check(self):
        self.structured = structured_mode(self.structured)
        self.local_engine = check_choice("local_engine", self.local_engine, ("auto", "llamacpp", "transformers"))
        integer_at_least(self, 1, "max_new_tokens")
        at_least(self, 0, "temperature")
        integer_at_least(self, 1, "context_window", optional=True)
        _one_of("prompt_set", self.prompt_set, PROMPT_SETS)
        check_local_conflict(self.oracle_model, self.base_url, context_window=self.context_window,
                             context_tokenizer=self.context_tokenizer)


@dataclass
class OracleClientConfig(_Checked):
    """How oracle requests are sent: rate, concurrency, retries, batching. Only the commands that
    send requests take these (`reflectune estimate` sends nothing and refuses them)."""

    help_group = "oracle"
    batch_api: bool = field(default=False, metadata=_help("use the OpenAI Batch API (half price, hours of latency)"))
    max_concurrency: int = field(default=32, metadata=_help("requests in flight"))
    timeout: float = field(default=120.0, metadata=_help(
        "seconds an HTTP attempt to the oracle server may take before it is retried"))
    max_retries: int = field(default=6, metadata=_help(
        "retries per oracle request (429, 5xx, timeouts, dropped connections, malformed answers; exponential "
        "backoff, Retry-After honoured); a request still failing after them fails its row, and a rerun retries it"))
    requests_per_minute: Optional[float] = field(default=None, metadata=_help("rate limit"))
    tokens_per_minute: Optional[float] = field(default=None, metadata=_help("rate limit"))
    local_batch_size: int = field(default=8, metadata=_help("generation batch of a local: oracle"))
    format_retries: int = field(default=1, metadata=_help("re-asks when an answer does not parse"))
    reflect_batch_size: int = field(default=64, metadata=_help("rows per map batch (one oracle call each)"))
    backend: str = field(default="auto", metadata=_help(
        "the oracle server: auto (recognised from /v1/models), llamacpp, vllm, openai or plain"))

    def _check(self):
        self.backend = check_choice("backend", self.backend, BACKENDS)
        integer_at_least(self, 1, "max_concurrency", "local_batch_size", "reflect_batch_size")
        integer_at_least(self, 0, "format_retries")
        at_least(self, 0, "timeout", strict=True)
        integer_at_least(self, 0, "max_retries")
        at_least(self, 0, "requests_per_minute", "tokens_per_minute", optional=True, strict=True)


@dataclass
class OracleConfig(OracleClientConfig, OracleRequestConfig):
    """The oracle LLM that compresses and reflects: what is asked and how it is sent."""

    def _check(self):
        check_local_conflict(self.oracle_model, batch_api=self.batch_api, requests_per_minute=self.requests_per_minute,
                             tokens_per_minute=self.tokens_per_minute)
        check_batch_conflict(self.batch_api, requests_per_minute=self.requests_per_minute,
                             tokens_per_minute=self.tokens_per_minute, context_window=self.context_window,
                             context_tokenizer=self.context_tokenizer)


@dataclass
class StudentConfig(_Checked):
    """The student model that scores IFD and r-IFD."""

    help_group = "student"
    student_model: str = field(default="smollm2-135m-instruct", metadata=_help("alias, Hub id or local path"))
    template: str = field(default="vicuna", metadata=_help(
        "scoring template: vicuna, alpaca, wizardlm, or plain (for base models that know no chat template)"))
    max_length: int = field(default=2048, metadata=_help("token limit per scored text"))
    dtype: str = field(default="float32", metadata=_help("float32, bfloat16 or float16"))
    device: Optional[str] = field(default=None, metadata=_help("cpu, cuda, cuda:1 ... (default: CUDA if present)"))
    max_tokens_per_batch: Optional[int] = field(default=None, metadata=_help(
        "padded tokens per forward pass (default: 16384 on GPU, 1024 on CPU)"))
    score_batch_size: int = field(default=256, metadata=_help("rows per map batch"))
    student_base_url: Optional[str] = field(default=None, metadata=_help(
        "score with the student served by vLLM or llama.cpp at this URL (ends in /v1); student_model is then "
        "the tokenizer loaded here"))
    student_server_model: Optional[str] = field(default=None, metadata=_help(
        "the student's name on that server (default: student_model)"))
    student_backend: str = field(default="auto", metadata=_help("auto, vllm, llamacpp or echo (OpenAI-legacy)"))
    student_max_concurrency: int = field(default=16, metadata=_help("served student: requests in flight"))

    def _check(self):
        _one_of("template", self.template, SCORING_TEMPLATES)
        _one_of("dtype", self.dtype, DTYPE_NAMES)
        integer_at_least(self, 2, "max_length")
        integer_at_least(self, 1, "score_batch_size")
        integer_at_least(self, 1, "student_max_concurrency")
        self.student_backend = student_backend(self.student_backend)
        integer_at_least(self, 1, "max_tokens_per_batch", optional=True)


@dataclass
class SelectionConfig(_Checked):
    """How the recycled data is selected."""

    help_group = "selection"
    negated_help = {"require_below_one": "V2: skip the IFD < 1 and r-IFD < 1 checks"}
    selection: str = field(default="v2", metadata=_help("v2 (Selective Reflection-Tuning), v1 (reflect_both) or none"))
    require_below_one: bool = field(default=True, metadata=_help(
        "V2: also require IFD < 1 and r-IFD < 1, as the authors' code does"))
    ratio: str = field(default="ppl", metadata=_help("ppl (ratios of perplexities, V2 code) or loss (Cherry LLM)"))
    top_fraction: Optional[float] = field(default=None, metadata=_help("then keep the top fraction by IFD"))

    def _check(self):
        _one_of("selection", self.selection, SELECTIONS)
        _one_of("ratio", self.ratio, RATIOS)
        if self.top_fraction is not None and not (isinstance(self.top_fraction, (int, float))
                                                  and not isinstance(self.top_fraction, bool)
                                                  and 0 < self.top_fraction <= 1):
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction!r}")
        if self.selection == "none":  # nothing is selected: a selection option would be silently ignored
            if self.top_fraction is not None:
                raise ValueError("top_fraction keeps the top of a selection, but selection is 'none': drop "
                                 "--top_fraction or pick --selection v2 or v1")
            if self.ratio != "ppl" or not self.require_below_one:  # their defaults look the same given or not
                logger.warning("selection is 'none': ratio and require_below_one are ignored")


@dataclass
class ReflectConfig(OracleConfig, DataConfig):
    """`reflectune reflect`: the four variants, no scores."""


@dataclass
class ScoreConfig(StudentConfig, DataConfig):
    """`reflectune score`: IFD / r-IFD columns for every split of the data."""


@dataclass
class SelectConfig(SelectionConfig, DataConfig):
    """`reflectune select`: selection on scored variants."""


@dataclass
class RecycleConfig(SelectionConfig, StudentConfig, OracleConfig, DataConfig):
    """`reflectune recycle`: the whole method, from raw pairs to selected, published data."""


@dataclass
class EstimateConfig(OracleRequestConfig, InputConfig):
    """`reflectune estimate`: tokens and money of a reflect run, before anything is sent."""

    help_group = "prices"
    input_price: Optional[float] = field(default=None, metadata=_help("price per million prompt tokens"))
    output_price: Optional[float] = field(default=None, metadata=_help("price per million output tokens"))
    tokenizer: str = field(default="smollm2-135m-instruct", metadata=_help("tokenizer that counts prompt tokens"))

    def _check(self):
        at_least(self, 0, "input_price", "output_price", optional=True)
        if (self.input_price is None) != (self.output_price is None):  # a missing price is not a free side
            raise ValueError("give both --input_price and --output_price (0 for a side that costs nothing), or "
                             "neither for no cost")
