"""The `reflectune eval` job: answer test sets with two models (or take two response files),
judge the answers in both orders, print the table and write the chart.

`EvalConfig` is a dataclass usable from Python, YAML and the command line (`make_parser`, also
behind `scripts/evaluate.py`); `run_eval(config)` does the work and returns the summaries.

Outputs in `output_dir`: `<test set>.jsonl` (every row: question, both answers with their
statuses, both judge answers, scores and verdict), `summary.json` (`judge_summary` per test set
and the configuration, without secrets) and `judge.png` (`plot_judge`).

Example (Python):
    >>> from reflectune_hf.cli.eval_job import EvalConfig, run_eval
    >>> config = EvalConfig(test_sets=["vicuna"], eval_dir="../shared/data/eval", max_rows=8,
    ...                     model_a="my-sft-model", model_b="smollm2-135m-instruct",
    ...                     judge_model="gpt-4o", judge_base_url="https://api.example.com/v1")
    >>> summaries = run_eval(config)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..data import read_records
from ..evaluation.judge import format_judge_table, judge_summary, plot_judge
from ..evaluation.stages import GenerateResponses, PairwiseJudge, load_eval_set
from ..oracles.factory import check_local_conflict, make_oracle
from ..sanitize import sanitize_config
from ..utils import dataset_from_records
from .configs import at_least, integer_at_least

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Configuration of `run_eval` (every field is a flag of `reflectune eval`).

    A model is answered by an OpenAI-compatible server when its `base_url` is set (the server
    applies the chat template), else loaded locally with `TransformersOracle` (its tokenizer's
    chat template); embedded aliases, Hub ids and local directories all work.
    """

    help_groups = {  # the flags' headings in `reflectune eval --help`
        "test_sets": "test sets", "eval_dir": "test sets", "max_rows": "test sets",
        "model_a": "models", "base_url_a": "models", "model_b": "models", "base_url_b": "models",
        "responses_a": "models", "responses_b": "models", "max_new_tokens": "models", "temperature": "models",
        "judge_model": "judge", "judge_base_url": "judge", "judge_max_tokens": "judge",
        "timeout": "servers", "max_retries": "servers",
        "label_a": "output", "label_b": "output", "output_dir": "output",
    }

    test_sets: list[str] = field(default_factory=list, metadata={
        "help": "Test-set files, or names looked up in --eval_dir (vicuna, wizardlm, koala, sinstruct, lima)."})
    eval_dir: Optional[str] = field(default=None, metadata={"help": "Folder of <name>_test_set.jsonl files."})
    max_rows: Optional[int] = field(default=None, metadata={"help": "Only the first N questions of each set."})
    model_a: Optional[str] = field(default=None, metadata={"help": "Model A (the one evaluated)."})
    base_url_a: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible server of model A."})
    model_b: Optional[str] = field(default=None, metadata={"help": "Model B (the baseline)."})
    base_url_b: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible server of model B."})
    responses_a: Optional[str] = field(default=None, metadata={
        "help": "Instead of model A: a JSON(L) file with `instruction` and `response` (e.g. written by an earlier "
                "run), aligned with --responses_b by `id` when both have it, else by row order."})
    responses_b: Optional[str] = field(default=None, metadata={"help": "Instead of model B: a response file."})
    judge_model: Optional[str] = field(default=None, metadata={"help": "The judge model (required)."})
    judge_base_url: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible server of the judge."})
    timeout: float = field(default=120.0, metadata={"help": "Seconds an HTTP attempt to a server may take."})
    max_retries: int = field(default=6, metadata={"help": "Retries per server request (429, 5xx, timeouts, ...)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Answer length limit (tokens)."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature of the answers."})
    judge_max_tokens: int = field(default=1024, metadata={"help": "Judge answer limit (1024 in the authors' code)."})
    label_a: str = field(default="A", metadata={"help": "Name of model A in the table and chart."})
    label_b: str = field(default="B", metadata={"help": "Name of model B in the table and chart."})
    output_dir: str = field(default="reflectune-output/eval", metadata={"help": "Where results are written."})

    def __post_init__(self):
        if isinstance(self.test_sets, str):
            self.test_sets = [self.test_sets]
        files = (self.responses_a, self.responses_b)
        if any(files) and not all(files):
            raise ValueError("Give both --responses_a and --responses_b, or neither")
        if all(files) and (self.model_a or self.model_b):
            raise ValueError("Give either two response files or two models, not both")
        unused = [name for name in ("test_sets", "eval_dir", "base_url_a", "base_url_b") if getattr(self, name)]
        if all(files) and unused:  # the questions and answers come from the files: these would be ignored
            raise ValueError(f"--{unused[0]} is for models that answer test sets; two response files hold the "
                             f"questions and answers: drop --{unused[0]}")
        if not all(files):
            if not (self.model_a and self.model_b):
                raise ValueError("Give --model_a and --model_b (or --responses_a and --responses_b)")
            if not self.test_sets:
                raise ValueError("Give at least one test set (--test_sets) to answer")
        if not self.judge_model:
            raise ValueError("--judge_model is required")
        integer_at_least(self, 1, "max_rows", optional=True)
        integer_at_least(self, 1, "max_new_tokens", "judge_max_tokens")
        integer_at_least(self, 0, "max_retries")
        at_least(self, 0, "temperature")
        at_least(self, 0, "timeout", strict=True)
        for model, url in (("model_a", "base_url_a"), ("model_b", "base_url_b"), ("judge_model", "judge_base_url")):
            check_local_conflict(getattr(self, model), getattr(self, url), what=model, url_flag=url)


DESCRIPTION = ("Answer instruction test sets with two models (or read two response files), judge the answers "
               "pairwise in both orders, print the win / tie / lose table and write the chart. Servers' API keys "
               "come from the environment (OPENAI_API_KEY).")


def make_parser(subparsers=None, prog: str | None = None):
    """The command line of `reflectune eval` (and `scripts/evaluate.py`): `EvalConfig`'s fields as
    grouped flags, or a `--config` YAML file."""
    from .arguments import CommandParser

    if subparsers is not None:
        return subparsers.add_parser("eval", help="Judge two models' answers pairwise", dataclass_types=(EvalConfig,))
    return CommandParser((EvalConfig,), prog=prog, description=DESCRIPTION)


def _answered(config: EvalConfig) -> dict:
    """{test set name: Dataset with instruction, input, response_a, response_b (+ statuses)}."""
    server = {"timeout": config.timeout, "max_retries": config.max_retries, "local_without_base_url": True}
    sets = {}
    for spec in config.test_sets:  # all read first: a bad or repeated name fails before any model loads
        ds = load_eval_set(spec, eval_dir=config.eval_dir, max_rows=config.max_rows)
        name = ds[0]["test_set"]
        if name in sets:
            raise ValueError(f"two test sets are named {name!r} ({sets[name][0]!r} and {spec!r}): their rows, "
                             f"{name}.jsonl and summary would overwrite each other; rename one file")
        sets[name] = (spec, ds)
    oracle_a = make_oracle(config.model_a, config.base_url_a, max_new_tokens=config.max_new_tokens, **server)
    oracle_b = make_oracle(config.model_b, config.base_url_b, max_new_tokens=config.max_new_tokens, **server)
    out = {}
    for name, (_, ds) in sets.items():
        for column, oracle in (("response_a", oracle_a), ("response_b", oracle_b)):
            stage = GenerateResponses(oracle, column=column, max_tokens=config.max_new_tokens,
                                      temperature=config.temperature)
            ds = ds.map(stage, batched=True, batch_size=32, desc=f"Answering {name} ({column})")
        out[name] = ds
    return out


def _read_responses(path: str):
    ds = dataset_from_records(read_records(path))  # every key of any row, not only the first row's
    column = "response" if "response" in ds.column_names else "output"
    missing = [c for c in ("instruction", column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path} needs the columns instruction and response (or output); it has {ds.column_names}")
    return ds, column


def _paired(config: EvalConfig) -> dict:
    """The two response files, checked question by question, as one Dataset per test set (its
    first `max_rows` rows when set)."""
    from datasets import Dataset

    (ds_a, col_a), (ds_b, col_b) = _read_responses(config.responses_a), _read_responses(config.responses_b)
    if "id" in ds_a.column_names and "id" in ds_b.column_names:
        for path, ids in ((config.responses_a, ds_a["id"]), (config.responses_b, ds_b["id"])):
            repeated = [i for i, count in Counter(ids).items() if count > 1]
            if repeated:  # pairing by id would judge one answer twice and drop another
                raise ValueError(f"{path} repeats the ids {repeated[:5]}: the two files are paired by id, so each "
                                 "id must name one row")
        by_id = {i: k for k, i in enumerate(ds_b["id"])}
        missing = [i for i in ds_a["id"] if i not in by_id]
        if missing or len(ds_a) != len(ds_b):
            raise ValueError(f"{config.responses_a} and {config.responses_b} do not hold the same ids "
                             f"({len(ds_a)} vs {len(ds_b)} rows; first ids only in A: {missing[:5]})")
        ds_b = ds_b.select([by_id[i] for i in ds_a["id"]])
    elif len(ds_a) != len(ds_b):
        raise ValueError(f"{config.responses_a} has {len(ds_a)} rows but {config.responses_b} has {len(ds_b)}")
    rows = []
    for k, (a, b) in enumerate(zip(ds_a, ds_b)):
        question_a, question_b = ((r["instruction"], r.get("input") or "") for r in (a, b))
        if question_a != question_b:  # one instruction may be asked of several inputs
            which = 0 if question_a[0] != question_b[0] else 1
            raise ValueError(f"Row {k} asks different questions in the two files: {question_a[which][:60]!r} vs "
                             f"{question_b[which][:60]!r}")
        rows.append({"id": a.get("id", k), "instruction": a["instruction"], "input": a.get("input") or "",
                     "test_set": a.get("test_set") or Path(config.responses_a).stem,
                     "response_a": a[col_a] or "", "response_b": b[col_b] or ""})
    merged = Dataset.from_list(rows)
    names = list(dict.fromkeys(merged["test_set"]))
    sets = {name: merged.filter(lambda r, n=name: r["test_set"] == n) for name in names}
    if config.max_rows is not None:  # the first questions of each set, as for the test sets models answer
        sets = {name: ds.select(range(min(config.max_rows, len(ds)))) for name, ds in sets.items()}
    return sets


def run_eval(config: EvalConfig) -> dict:
    """Answer (or read), judge in both orders, summarise, print the table, write the files.

    Returns:
        `{"summaries": {test set: judge_summary}, "files": {...}, "table": str}`.
    """
    answered = _paired(config) if config.responses_a else _answered(config)
    judge = PairwiseJudge(make_oracle(config.judge_model, config.judge_base_url, max_new_tokens=config.judge_max_tokens,
                                      timeout=config.timeout, max_retries=config.max_retries,
                                      local_without_base_url=True),
                          max_tokens=config.judge_max_tokens)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries, files = {}, {}
    for name, ds in answered.items():
        judged = ds.map(judge, batched=True, batch_size=16, desc=f"Judging {name}")
        files[name] = str(out / f"{name}.jsonl")
        judged.to_json(files[name], lines=True, force_ascii=False)
        summaries[name] = judge_summary(judged)
    title = f"{config.label_a} vs {config.label_b} (judge: {config.judge_model})"
    files["chart"] = str(plot_judge(summaries, out / "judge.png", title=title, labels=(config.label_a, config.label_b)))
    files["summary"] = str(out / "summary.json")
    # No key fields exist (servers read keys from the environment); URLs lose any user:password@
    # and secret-named query parameters (`?api_key=...`).
    settings = sanitize_config(asdict(config))
    Path(files["summary"]).write_text(json.dumps({"config": settings, "summaries": summaries}, indent=2) + "\n")
    table = format_judge_table(summaries)
    print(f"{title}\n{table}")
    logger.info("run_eval wrote %s", files)
    return {"summaries": summaries, "files": files, "table": table}
