"""Supervised fine-tuning with the Vicuna v1.1 template and assistant-only loss, TRL-style: a thin
wrapper around `reflectune_hf.cli.sft_job` (the job of `reflectune sft`).

The same arguments as TRL's `trl sft` (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig),
with the paper's hyperparameters as defaults (`reflectune_hf.training.sft.paper_hyperparameters`), the
packaged Vicuna template as `chat_template_path`, embedded model aliases and Alpaca data accepted:
Alpaca rows are turned into `messages` and checked before the model loads.

# CPU smoke run (16 rows of the bundled sample, the embedded SmolLM2, a few steps)
```bash
python scripts/sft.py --config scripts/configs/smoke_cpu.yaml
```

# The paper's 7B recipe on 8 GPUs (FSDP); any YAML key can be overridden on the command line
```bash
accelerate launch --config_file scripts/configs/accelerate/fsdp.yaml scripts/sft.py \
    --config scripts/configs/vicuna_7b.yaml --dataset_name my-org/recycled-alpaca --output_dir llama2-7b-recycled
```

The recipes use only TRL's own keys, so `trl sft --config <recipe>.yaml` runs them too (with a Hub id
or local path as the model and a dataset that already has a `messages` column).
"""

import logging

from reflectune_hf.cli.main import parse_arguments
from reflectune_hf.cli.sft_job import check_args, make_parser, run_sft  # noqa: F401  (make_parser: TRL's script shape)


def main(script_args, training_args, model_args, dataset_args=None):
    run_sft(script_args, training_args, model_args, dataset_args)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(*parse_arguments(make_parser(), check=check_args))  # a bad flag or value: one line, exit 2
