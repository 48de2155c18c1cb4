"""Tuna fine-tuning (probabilistic, then contextual ranking), TRL-style: a thin wrapper around
`reflectune_hf.cli.tuna_job` (the job of `reflectune tuna`).

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
else a local transformers model. Oracle answers are cached, so a rerun does not pay twice.

# CPU smoke run (4 sample rows, SmolLM2 as teacher and student, 3 steps), from the repository root
```bash
python scripts/tuna.py --config scripts/configs/tuna_smoke_cpu.yaml
```

# The paper's two stages on GPUs, from an Alpaca SFT model (scripts/sft.py)
```bash
accelerate launch scripts/tuna.py --config scripts/configs/tuna_probabilistic.yaml \
    --model_name_or_path <alpaca-sft-model> --output_dir tuna-p
accelerate launch scripts/tuna.py --config scripts/configs/tuna_contextual.yaml \
    --model_name_or_path tuna-p --output_dir tuna
```
"""

import logging

from reflectune_hf.cli.tuna_job import make_parser, run_tuna  # noqa: F401  (make_parser: TRL's script shape)


def main(script_args, training_args, model_args):
    run_tuna(script_args, training_args, model_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*make_parser().parse_args_and_config())
