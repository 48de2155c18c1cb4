"""Tuna fine-tuning (probabilistic, then contextual ranking), TRL-style: a thin wrapper around
`reflectune_hf.cli.tuna_job` (the job of `reflectune tuna`).

What it does, its arguments and the two ranking stages: `reflectune_hf.cli.tuna_job`.

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

from reflectune_hf.cli.main import parse_arguments
from reflectune_hf.cli.tuna_job import check_args, make_parser, run_tuna  # noqa: F401  (TRL's script shape)


def main(script_args, training_args, model_args):
    run_tuna(script_args, training_args, model_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*parse_arguments(make_parser(), check=check_args))  # a bad flag or value: one line, exit 2
