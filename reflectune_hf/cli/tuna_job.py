"""The `reflectune tuna` job: Tuna fine-tuning (probabilistic, then contextual ranking), TRL-style
(`scripts/tuna.py` is a thin wrapper around it).

Arguments: `TunaScriptArguments` (data and the oracle that ranks it), `TunaConfig` (transformers'
`TrainingArguments` plus Tuna's `mle_weight`, `margin`, `ce_candidates`, `max_length`, `template`)
and TRL's `ModelConfig`. Data with a `ranked_responses` column trains as it is; otherwise it is
ranked first, and `ranked_dataset_path` keeps the ranked data (`save_to_disk`):

- `stage: probabilistic`: the teacher `oracle_model` samples `num_responses` answers with logprobs
  (`SampleResponses`), ranked by mean token log-probability (`rank_by_logprob`).
- `stage: contextual`: the model being trained answers `num_responses` times (unless the data has
  `responses`), and the judge `oracle_model` ranks them with its own reference (`ContextualRank`).
  The student answers through its chat template (the Alpaca prompt is the user message; only its
  texts are asked for, no logprobs, so any OpenAI-compatible server can answer for it); a model
  without one is served with `student_base_url` (e.g. vLLM with `--chat-template`) or its answers
  come in a `responses` column.

The oracle is an OpenAI-compatible server when `oracle_base_url` is set (key in `OPENAI_API_KEY`),
else a local model (`oracles.factory.make_oracle`: llama.cpp for an embedded GGUF). Oracle answers are cached, so a rerun does not pay twice.

Run it as `reflectune tuna --config scripts/configs/tuna_smoke_cpu.yaml` (the CPU smoke run) or
through `scripts/tuna.py` (its docstring has the paper's two GPU stages).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Optional

logger = logging.getLogger(__name__)


DESCRIPTION = ("Tuna fine-tuning: rank several answers per instruction (probabilistic: a teacher's "
               "log-probabilities; contextual: a judge), then train on the ranking. Data that already has "
               "ranked_responses trains as it is.")


@dataclass
class TunaScriptArguments:
    """Data and ranking arguments of `reflectune tuna` (and `scripts/tuna.py`)."""

    help_group = "data and ranking"
    dataset_name: str = field(default="sample", metadata={
        "help": "'sample', a JSON/JSONL/Parquet file, a save_to_disk folder or a Hub id."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of a Hub dataset."})
    max_samples: Optional[int] = field(default=None, metadata={"help": "Use the first rows only."})
    stage: str = field(default="probabilistic", metadata={
        "help": "How rows without ranked_responses are ranked: 'probabilistic' or 'contextual'."})
    oracle_model: Optional[str] = field(default=None, metadata={
        "help": "The teacher (probabilistic) or judge (contextual) model."})
    oracle_base_url: Optional[str] = field(default=None, metadata={
        "help": "OpenAI-compatible server of oracle_model; unset: the model runs in this process "
                "(llama.cpp for an embedded GGUF)."})
    num_responses: int = field(default=4, metadata={"help": "Responses sampled per instruction."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the responses."})
    sample_max_tokens: int = field(default=512, metadata={"help": "Token budget of each sampled response."})
    judge_max_tokens: int = field(default=2048, metadata={"help": "Token budget of the judge's answer."})
    oracle_max_concurrency: int = field(default=32, metadata={"help": "Requests in flight to the server."})
    oracle_timeout: float = field(default=120.0, metadata={"help": "Seconds an HTTP attempt to a server may take."})
    oracle_max_retries: int = field(default=6, metadata={
        "help": "Retries per server request (429, 5xx, timeouts, ...)."})
    student_base_url: Optional[str] = field(default=None, metadata={
        "help": "contextual: a server answering for the model being trained (needed when it has no chat template); "
                "unset: the model itself through transformers."})
    ranked_dataset_path: Optional[str] = field(default=None, metadata={
        "help": "save_to_disk the ranked data here before training."})
    mix_original: bool = field(default=False, metadata={
        "help": "Also train on each original Alpaca pair as a one-candidate (CE only) row, for regularisation."})


STAGES = ("probabilistic", "contextual")


def check_args(script_args, training_args=None, model_args=None) -> None:
    """Bad arguments, found before anything loads (`reflectune tuna` exits 2 on them): a `ValueError`
    naming the first bad one."""
    from ..oracles.factory import check_local_conflict
    from .configs import at_least, integer_at_least

    if script_args.stage not in STAGES:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {script_args.stage!r}")
    integer_at_least(script_args, 1, "max_samples", optional=True)
    integer_at_least(script_args, 1, "num_responses", "sample_max_tokens", "judge_max_tokens",
                     "oracle_max_concurrency")
    integer_at_least(script_args, 0, "oracle_max_retries")
    at_least(script_args, 0, "sample_temperature")
    at_least(script_args, 0, "oracle_timeout", strict=True)
    check_local_conflict(script_args.oracle_model, script_args.oracle_base_url, url_flag="oracle_base_url")
    if model_args is not None and not model_args.model_name_or_path:
        raise ValueError("Set --model_name_or_path (the model to train: an embedded alias such as "
                         "smollm2-135m-instruct, a Hub id or a local directory), or `model_name_or_path:` in the "
                         "--config file.")


def rank_dataset(ds, script_args, student_model: str):
    """Add `ranked_responses` to Alpaca rows with the stage's oracle(s)."""
    from ..tuna.stages import ContextualRank, SampleResponses, rank_by_logprob

    if not script_args.oracle_model:
        raise ValueError(f"The data has no ranked_responses: set oracle_model (the {script_args.stage} ranking's "
                         f"{'teacher' if script_args.stage == 'probabilistic' else 'judge'}) to rank it.")
    from ..oracles.factory import make_oracle
    from ..oracles.rerun import map_stage, status_failures

    server = dict(max_concurrency=script_args.oracle_max_concurrency, timeout=script_args.oracle_timeout,
                  max_retries=script_args.oracle_max_retries, local_without_base_url=True)
    oracle = make_oracle(script_args.oracle_model, script_args.oracle_base_url,
                         max_new_tokens=max(script_args.sample_max_tokens, script_args.judge_max_tokens), **server)
    sample = dict(n=script_args.num_responses, temperature=script_args.sample_temperature,
                  max_tokens=script_args.sample_max_tokens)
    if script_args.stage == "probabilistic":
        # map_stage: a rerun re-sends the rows whose request failed, where `map` would replay them from the cache
        ds = map_stage(ds, SampleResponses(oracle, **sample), failed=status_failures("sample_status"),
                       desc="Tuna: sampling the teacher")
        ds = ds.map(rank_by_logprob, batched=True, desc="Tuna: ranking by log-probability")
    elif script_args.stage == "contextual":
        if "responses" not in ds.column_names:
            student = make_oracle(student_model, script_args.student_base_url,
                                  max_new_tokens=script_args.sample_max_tokens, **server)
            # The judge ranks the texts: no logprobs asked, so a server without them still answers.
            ds = map_stage(ds, SampleResponses(student, logprobs=False, **sample),
                           failed=status_failures("sample_status"), desc="Tuna: sampling the student")
        judge = ContextualRank(oracle, max_tokens=script_args.judge_max_tokens)
        ds = map_stage(ds, judge, failed=status_failures("ranking_status"), desc="Tuna: contextual ranking")
    else:
        raise ValueError(f"stage must be one of {list(STAGES)}, got {script_args.stage!r}")
    logger.info("Ranking statuses: %s", dict(Counter(ds["ranking_status"])))
    return ds


def load_ranked_data(script_args, student_model: str):
    import datasets

    from ..data import load_data

    base = load_data(script_args.dataset_name, split=script_args.dataset_train_split)
    if script_args.max_samples is not None:
        base = base.select(range(min(script_args.max_samples, len(base))))
    ds = base
    if "ranked_responses" not in ds.column_names:
        ds = rank_dataset(ds, script_args, student_model)
        if script_args.ranked_dataset_path:
            ds.save_to_disk(script_args.ranked_dataset_path)
    # `system` (a row's own system prompt, from TRL data) is kept for TunaTrainer to count: it trains without it.
    ds = ds.select_columns([c for c in ("id", "instruction", "input", "system", "ranked_responses")
                            if c in ds.column_names])
    if script_args.mix_original:  # the reference adds the original Alpaca pairs "for regularization"
        original = base.map(lambda out: {"ranked_responses": [out]}, input_columns="output")
        ds = datasets.concatenate_datasets([ds, original.select_columns(ds.column_names).cast(ds.features)])
    return ds


def load_model(model_args):
    """The model to train, in `model_args.dtype` (float32 when unset: fp32 master weights; the
    recipes add bf16 autocast with `bf16: true`, as the Vicuna ones)."""
    from transformers import AutoModelForCausalLM

    from ..models import resolve_model

    return AutoModelForCausalLM.from_pretrained(
        resolve_model(model_args.model_name_or_path), revision=model_args.model_revision,
        dtype=model_args.dtype or "float32", attn_implementation=model_args.attn_implementation)


def run_tuna(script_args, training_args, model_args):
    """Rank the data if it is not ranked yet, train with `TunaTrainer`, save (and push if asked)."""
    import transformers
    from packaging.version import Version

    from ..tuna.trainer import TunaTrainer

    check_args(script_args, training_args, model_args)
    dataset = load_ranked_data(script_args, model_args.model_name_or_path)
    model = load_model(model_args)
    trainer = TunaTrainer(model, args=training_args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json with the loss history
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction = None, prog: str = None):
    """The command line of `reflectune tuna` (and `scripts/tuna.py`): data and ranking flags first,
    then Tuna's training arguments and TRL's model arguments."""
    from trl import ModelConfig

    from ..tuna.trainer import TunaConfig
    from .arguments import first_group, trl_command_parser

    dataclass_types = (TunaScriptArguments, TunaConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser("tuna", help="Tuna ranking fine-tuning", dataclass_types=dataclass_types)
    parser = trl_command_parser(dataclass_types, prog=prog, description=DESCRIPTION)
    parser._optionals.title = "training (transformers' TrainingArguments, Tuna's loss) and model options"
    first_group(parser, "data and ranking", {"help": None, "config": None,
                                             **{f.name: None for f in fields(TunaScriptArguments)}})
    return parser
