"""The jobs behind the `reflectune` command, as plain Python: configs are dataclasses (the same
field names in Python, YAML files and command-line flags), jobs are functions.

`recycle` is the whole method: load → compress → four variants → extract → IFD/r-IFD scores →
selection → save (and push) with a card → closing summary. Every step is a `Dataset.map` served
by datasets' cache on a rerun, and every oracle answer is cached per request, so a killed run
rerun with the same configuration resumes where it stopped and sends nothing twice.

Example:
    >>> from reflectune_hf.cli.jobs import RecycleConfig, run_recycle
    >>> config = RecycleConfig(oracle_model="local:smollm2-135m-instruct", limit=4, max_new_tokens=64,
    ...                        output_dir="out")
    >>> print(run_recycle(config).table())  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Optional

from ..data import load_data
from ..oracles import ChatRequest
from ..oracles.factory import make_oracle
from ..publishing.outputs import RUN_RECORD
from ..sanitize import sanitize_config
from .configs import (  # noqa: F401  (the job configs, also importable from here)
    DataConfig, EstimateConfig, OracleClientConfig, OracleConfig, OracleRequestConfig, RecycleConfig, ReflectConfig,
    ScoreConfig, SelectConfig, SelectionConfig, StudentConfig)

logger = logging.getLogger(__name__)
ORACLE_REQUIRED = ("--oracle_model is required: a model name on an OpenAI-compatible server "
                   "(with --base_url for vLLM, TGI, Ollama or llama.cpp) or local:<model>")
CONTEXT_FILE = RUN_RECORD  # the run's configuration without secrets: `--config` reproduces the run


# --------------------------------------------------------------------------------------------- steps


def load_input(config: DataConfig):
    """The data of `config.data`: a `DatasetDict` when it is a saved multi-split folder, else a
    `Dataset` through `data.load_data`; `limit` keeps the first rows of every split. Data without
    any row is refused; an empty split next to others (a selection that kept nothing) is not."""
    from datasets import DatasetDict, load_from_disk

    path = Path(config.data).expanduser()
    saved = path / "arrow" if (path / "arrow").is_dir() else path
    if (saved / "dataset_dict.json").is_file():
        data = load_from_disk(str(saved))
    else:
        source = str(saved) if saved != path else config.data
        if config.split != "train" and (source == "sample" or Path(source).expanduser().exists()):
            raise ValueError(f"--split {config.split}: {config.data} has one split; --split picks a split of a Hub "
                             "dataset or of a saved multi-split folder")
        data = load_data(source, split=config.split)
    if config.limit is not None:
        cut = lambda ds: ds.select(range(min(config.limit, len(ds))))  # noqa: E731
        data = DatasetDict({k: cut(v) for k, v in data.items()}) if isinstance(data, DatasetDict) else cut(data)
    if isinstance(data, DatasetDict):
        empty = [name for name, ds in data.items() if len(ds) == 0]
        if empty and len(empty) < len(data):
            logger.info("%s: split(s) %s have no rows", config.data, empty)
            empty = []
    else:
        empty = ["data"] if len(data) == 0 else []
    if empty:
        raise ValueError(f"{config.data}: no rows in {empty}")
    return data


def config_oracle(config: OracleRequestConfig):
    """The oracle of `config.oracle_model` (`oracles.factory.make_oracle`) with the config's
    server, context and local settings, and its rate, retry and batch settings when it has them
    (an `OracleConfig`; `EstimateConfig` sends nothing and has none)."""
    if not config.oracle_model:
        raise ValueError(ORACLE_REQUIRED)
    sending = ("batch_api", "local_batch_size", "backend", "timeout", "max_retries", "max_concurrency",
               "requests_per_minute", "tokens_per_minute")
    return make_oracle(config.oracle_model, config.base_url, max_new_tokens=config.max_new_tokens,
                       local_engine=config.local_engine, structured=config.structured,
                       context_window=config.context_window, context_tokenizer=config.context_tokenizer,
                       **{name: getattr(config, name) for name in sending if hasattr(config, name)})


def _stage_kwargs(config: OracleRequestConfig) -> dict:
    kwargs = {"prompt_set": config.prompt_set, "max_tokens": config.max_new_tokens,
              "temperature": config.temperature, "structured": config.structured}
    if isinstance(config, OracleClientConfig):  # re-asks: only a run that sends has them
        kwargs["format_retries"] = config.format_retries
    return kwargs


def reflect(config: ReflectConfig, data=None, oracle=None):
    """The four aligned variants (`variants.build_variants`) of the configured data (`load_pairs`)."""
    from ..reflection.variants import build_variants

    data = load_pairs(config) if data is None else data
    oracle = config_oracle(config) if oracle is None else oracle
    return build_variants(data, oracle, compress=config.compress, batch_size=config.reflect_batch_size,
                          **_stage_kwargs(config))


def score(config: StudentConfig, data):
    """IFD / r-IFD columns (`scoring.IFDScorer`) on every split of `data`."""
    from ..scoring.ifd import IFDScorer, map_scores

    scorer = IFDScorer(model=config.student_model, template=config.template, max_length=config.max_length,
                       dtype=config.dtype, device=config.device, max_tokens_per_batch=config.max_tokens_per_batch,
                       base_url=config.student_base_url, server_model=config.student_server_model,
                       student_backend=config.student_backend, max_concurrency=config.student_max_concurrency)
    # map_scores: a 0-row split gets the score columns too (datasets' map does not call the scorer on it)
    return map_scores(data, scorer, batch_size=config.score_batch_size, desc="IFD / r-IFD")


def select(config: SelectionConfig, variants):
    """The selected rows (`select.select_v2` / `select_v1`, then `top_k_by`), or None."""
    from ..selection.select import select_v1, select_v2, top_k_by

    if config.selection == "none":
        return None
    chosen = (select_v2(variants, require_below_one=config.require_below_one, ratio=config.ratio)
              if config.selection == "v2" else select_v1(variants))
    if config.top_fraction is not None:
        column = "ifd" if config.ratio == "ppl" else "ifd_loss"
        chosen = top_k_by(chosen, column, fraction=config.top_fraction)
    return chosen


def config_record(config) -> dict:
    """The configuration as `reflectune_config.json` holds it: every field of the job's config
    (`sanitize.sanitize_config`: no secrets, URLs without user or password), so
    `reflectune <command> --config <out>/reflectune_config.json` parses to the same config.

    Example:
        >>> from reflectune_hf.cli.jobs import RecycleConfig, config_record
        >>> record = config_record(RecycleConfig(oracle_model="m", base_url="http://u:p@127.0.0.1:8000/v1"))
        >>> record["base_url"], record["max_new_tokens"], RecycleConfig(**record) == RecycleConfig(
        ...     oracle_model="m", base_url="http://127.0.0.1:8000/v1")
        ('http://127.0.0.1:8000/v1', 2048, True)
    """

    return sanitize_config(asdict(config))


def publish(config: DataConfig, data, card_context: dict) -> Path:
    """Save to `output_dir` (data, card, plots, `reflectune_config.json`; what an earlier run
    wrote there and this one does not is removed, see `publishing.outputs`) and push when
    `push_to_hub` is set."""
    from ..publishing.hub import push_to_hub, save_local

    quality = None
    if config.quality_report:
        from ..evaluation.quality import quality_report

        quality = quality_report(data if hasattr(data, "keys") else {"train": data}, coherence=True)  # as the card
    out = save_local(data, config.output_dir, card_context=card_context, quality=quality,
                     run_record=config_record(config))
    if config.push_to_hub:
        url = push_to_hub(data, config.push_to_hub, private=config.private, card_context=card_context,
                          quality=quality)
        logger.info("Pushed to %s", url)
    return out


def card_context(config, oracle=None, data=None) -> dict:
    """What the card shows of a configuration (a config dataclass, or the dict of a
    `reflectune_config.json`): its fields, `data` as `source_dataset`; `sanitize.sanitize_context`
    then drops secrets and reduces local paths to a name. The license is `config.license`, else
    the one the loaded `data` declares."""
    skip = ("output_dir", "private", "limit", "quality_report", "data")
    values = asdict(config) if is_dataclass(config) else dict(config or {})
    context = {k: v for k, v in values.items() if v is not None and k not in skip}
    if values.get("data"):
        context["source_dataset"] = values["data"]
    if "license" not in context and data is not None:
        first = next(iter(data.values())) if hasattr(data, "values") else data
        if getattr(first.info, "license", None):
            context["license"] = first.info.license
    if oracle is not None and getattr(oracle, "base_url", None) and "base_url" not in context:
        context["oracle_base_url"] = oracle.base_url
    return context


@dataclass
class JobResult:
    """What a job produced: the data, where it went, and counts for the closing table."""

    data: object
    output_dir: Path
    rows: dict
    statuses: dict
    selected: Optional[int]
    oracle_usage: dict
    seconds: float
    format_rates: Optional[dict] = None  # report.format_rates: per reflected split
    status_columns: Optional[dict] = None  # the column each split's `statuses` count

    def table(self) -> str:
        """The closing summary table printed by the CLI."""
        lines = [f"{'split':<22}{'rows':>7}  statuses"]
        for split, n in self.rows.items():
            counts = ", ".join(f"{k}: {v}" for k, v in self.statuses.get(split, {}).items())
            column = (self.status_columns or {}).get(split)  # reflection or score: say which
            lines.append(f"{split:<22}{n:>7}  {f'{column} ' if column and counts else ''}{counts}")
        from ..selection.select import SELECTED_SPLIT

        if self.selected is not None and SELECTED_SPLIT not in self.rows:
            lines.append(f"{SELECTED_SPLIT:<22}{self.selected:>7}")
        if self.format_rates:
            from ..publishing.report import format_rate_lines

            lines += ["answer format (rows, parsed in full, outcomes):", *format_rate_lines(self.format_rates)]
        if self.oracle_usage:
            lines.append("oracle usage: " + ", ".join(f"{k}={v}" for k, v in sorted(self.oracle_usage.items())))
        lines.append(f"written to {self.output_dir} in {self.seconds:.0f} s")
        return "\n".join(lines)


def _result(data, out: Path, selected, oracle, started: float) -> JobResult:
    from collections import Counter

    from datasets import DatasetDict

    splits = dict(data) if isinstance(data, DatasetDict) else {"train": data}
    statuses, columns = {}, {}
    for name, ds in splits.items():
        counts = {}
        for column in ("reflection_status", "score_status"):  # the first that says something of the split
            if column in ds.column_names:
                counts = {k: n for k, n in Counter(ds[column]).most_common() if k}
                if counts:
                    columns[name] = column
                    break
        statuses[name] = counts
    usage = dict(getattr(oracle, "usage", None) or {})
    from ..publishing.report import format_rates

    return JobResult(data, out, {k: len(v) for k, v in splits.items()}, statuses,
                     None if selected is None else len(selected), usage, time.monotonic() - started,
                     format_rates(splits, oracle=oracle_label(oracle)), columns)


def oracle_label(oracle) -> Optional[str]:
    """The oracle as the format rates name it: its model, and the backend that served it."""
    if oracle is None:
        return None
    model = getattr(oracle, "model", None) or type(oracle).__name__
    served = getattr(oracle, "served_backend", None)
    if callable(served) and getattr(oracle, "structured", "auto") != "off":
        return f"{model} ({served()})"
    return str(model)


def _with_selected(variants, chosen):
    from datasets import DatasetDict

    from ..selection.select import SELECTED_SPLIT

    return variants if chosen is None else DatasetDict({**variants, SELECTED_SPLIT: chosen})


def one_split(data, config: DataConfig, command: str):
    """`data`, or its split `config.split` when it holds several (a saved `DatasetDict` folder,
    e.g. an earlier run's output): the commands that take one split read `--split` there too."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        return data
    if config.split in data:
        return data[config.split]
    raise ValueError(f"{config.data} holds the splits {list(data)}, not {config.split!r}; {command} takes one: "
                     f"pick it with --split (e.g. --split {next(iter(data))})")


def every_split(data, config: DataConfig, command: str):
    """`data` for the commands that read every split of a saved multi-split folder: `--split` left
    at its default reads them all; `score` takes a split named there alone; `select` reads the
    variant splits together, so it refuses one."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict) or config.split == "train":
        return data
    if command == "select":
        raise ValueError(f"--split {config.split}: select reads the variant splits of {config.data} together; "
                         "drop --split")
    if config.split in data:
        return DatasetDict({config.split: data[config.split]})
    raise ValueError(f"--split {config.split}: {config.data} holds the splits {list(data)}; name one of them, "
                     f"or drop --split to {command} every split")


def load_pairs(config: DataConfig, command: str = "reflect"):
    """`load_input`, checked before any oracle call: one split of pairs that can be recycled (a
    non-empty instruction and output in every row; `train.check_sft_dataset` names the rows).
    `command` words the errors (`estimate` counts the same rows `reflect` would take)."""
    from ..training.sft import check_sft_dataset

    data = one_split(load_input(config), config, command)
    check_sft_dataset(data, stage=command, purpose="recycled (an oracle needs a non-empty instruction and output)")
    return data


def run_reflect(config: ReflectConfig) -> JobResult:
    started = time.monotonic()
    data = load_pairs(config)
    oracle = config_oracle(config)
    variants = reflect(config, data=data, oracle=oracle)
    return _result(variants, publish(config, variants, card_context(config, oracle, data)), None, oracle, started)


def run_score(config: ScoreConfig) -> JobResult:
    started = time.monotonic()
    data = every_split(load_input(config), config, "score")
    scored = score(config, data)
    return _result(scored, publish(config, scored, card_context(config, data=data)), None, None, started)


def run_select(config: SelectConfig) -> JobResult:
    from ..selection.select import VARIANT_SPLITS

    started = time.monotonic()
    variants = every_split(load_input(config), config, "select")
    missing = [s for s in VARIANT_SPLITS if s not in getattr(variants, "keys", lambda: [])()]
    if missing:
        raise ValueError(f"{config.data} lacks the variant split(s) {missing}: select reads the output of "
                         "`reflectune recycle` or `reflectune score`")
    variants = {k: v for k, v in variants.items() if k in VARIANT_SPLITS}
    from datasets import DatasetDict

    variants = DatasetDict(variants)
    chosen = select(config, variants)
    data = _with_selected(variants, chosen)
    return _result(data, publish(config, data, card_context(config, data=variants)), chosen, None, started)


def run_recycle(config: RecycleConfig) -> JobResult:
    """The whole method; see the module docstring."""
    started = time.monotonic()
    source = load_pairs(config)
    oracle = config_oracle(config)
    variants = reflect(config, data=source, oracle=oracle)
    variants = score(config, variants)
    chosen = select(config, variants)
    data = _with_selected(variants, chosen)
    return _result(data, publish(config, data, card_context(config, oracle, source)), chosen, oracle, started)


def estimate_requests(config: OracleRequestConfig, data) -> tuple[list[ChatRequest], list[ChatRequest]]:
    """First-attempt requests of a reflect run over `data` (re-asks not counted), as
    `(requests, stand_ins)`, built by the stages themselves (`stage.requests(batch)`, the requests
    `__call__` sends: stripped texts, inputs merged, rows without a request left out):
    compression of rows with an input, instruction reflection and response reflection of the
    origin pair; then, as stand-ins for the response reflection of the reflected pair (its
    instruction is unknown before the run), the origin pair's response requests."""
    from ..reflection.stages import CompressInstruction, NoOracle, ReflectInstruction, ReflectResponse

    kwargs = _stage_kwargs(config)
    batch = data.to_dict()
    requests = []
    if config.compress and "input" in batch:
        compress = CompressInstruction(NoOracle(), **kwargs)
        requests += compress.requests(batch)
        batch = {**batch, **compress(batch)}  # the lossless merge stands in for the compressed text
    requests += ReflectInstruction(NoOracle(), merge_input=True, **kwargs).requests(batch)
    stand_ins = ReflectResponse(NoOracle(), **kwargs).requests(batch)
    return requests + stand_ins, stand_ins


def run_estimate(config: EstimateConfig) -> dict:
    """Requests, tokens and money of a reflect run over the data; nothing is sent (the oracle's
    cache is only looked up, so requests answered before are not counted)."""
    from ..oracles.usage import estimate

    data = load_pairs(config, command="estimate")  # the rows reflect would take, checked as reflect checks them
    oracle = config_oracle(config)
    prices = None
    if config.input_price is not None:  # EstimateConfig: both prices or neither
        prices = {"input": config.input_price, "output": config.output_price}
    requests, stand_ins = estimate_requests(config, data)
    known = oracle.estimate(requests, prices=prices, tokenizer=config.tokenizer).to_dict()
    later = estimate(stand_ins, prices=prices, tokenizer=config.tokenizer).to_dict()
    total = {k: known[k] + later[k] for k in ("requests", "prompt_tokens", "output_tokens", "total_tokens")}
    total["cost"] = None if prices is None else known["cost"] + later["cost"]
    total.update(rows=len(data), cached_requests=known["cached_requests"], tokenizer=known["tokenizer"],
                 note="first attempts only; output tokens are max_new_tokens per request (an upper bound); "
                      "prompt tokens counted with a local tokenizer (an estimate)")
    return total
