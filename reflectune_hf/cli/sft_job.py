"""The `reflectune sft` job: supervised fine-tuning with the Vicuna v1.1 template and
assistant-only loss, TRL-style (`scripts/sft.py` is a thin wrapper around it).

The same arguments as TRL's `trl sft` (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig),
with the paper's hyperparameters as defaults (`reflectune_hf.training.sft.paper_hyperparameters`), the
packaged Vicuna template as `chat_template_path`, embedded model aliases and Alpaca data accepted:
Alpaca rows are turned into `messages` and checked before the model loads.

    reflectune sft --config scripts/configs/smoke_cpu.yaml      # CPU smoke run
    accelerate launch --config_file scripts/configs/accelerate/fsdp.yaml scripts/sft.py \
        --config scripts/configs/vicuna_7b.yaml --dataset_name my-org/recycled-alpaca --output_dir llama2-7b-recycled

Example (Python):
    >>> from reflectune_hf.cli.sft_job import make_parser, run_sft
    >>> args = make_parser().parse_args_and_config(["--model_name_or_path", "smollm2-135m-instruct",
    ...                                             "--dataset_name", "sample", "--output_dir", "out"])
    >>> args[1].learning_rate  # the paper's
    2e-05
    >>> run_sft(*args)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)


def load_datasets(script_args, dataset_args):
    """A DatasetDict from `datasets:` (TRL's mixture), or `dataset_name`: `"sample"` (the bundled
    40 rows), a directory saved with `save_to_disk`, a data file, or a Hub id."""
    import datasets
    from trl import get_dataset

    from ..data import load_data_file, load_sample

    if dataset_args is not None and dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are set; `datasets` is used.")
        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise ValueError("Set `dataset_name` (a Hub id, a local path or 'sample') or `datasets` in the config.")
    if name == "sample":
        return datasets.DatasetDict({"train": load_sample()})
    if os.path.isdir(os.path.join(name, "arrow")):  # a folder written by `reflectune` / `save_local`
        name = os.path.join(name, "arrow")
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(name)
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    if os.path.isfile(name):
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(name)[1])
        if builder is None:
            raise ValueError(f"Unsupported data file {name}: use .json, .jsonl, .parquet or .csv")
        return load_data_file(builder, name)
    return datasets.load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def train_split(dataset, wanted: str) -> str:
    """`wanted` when the data has it; for the default `train` of a `reflectune` output (splits
    `origin`, `reflect_*`, `selected`), its `selected` split; else a clear error. A split without
    rows is refused in one line (for `selected`: the selection kept nothing, and how to loosen it)."""
    if wanted in dataset:
        name = wanted
    elif wanted == "train" and "selected" in dataset:
        logger.info("No `train` split: training on `selected` (set dataset_train_split to pick another).")
        name = "selected"
    else:
        raise ValueError(f"The data has no split {wanted!r}, only {list(dataset)}: set dataset_train_split "
                         "(e.g. `--dataset_train_split reflect_both` for V1 data).")
    split = dataset[name]
    if hasattr(split, "__len__") and len(split) == 0:
        if name == "selected":
            raise ValueError("The split 'selected' has no rows: the selection kept none. Loosen it (`reflectune "
                             "select --data <folder> --no_require_below_one`, or a larger --top_fraction) or train "
                             "on another split (`--dataset_train_split reflect_both`).")
        raise ValueError(f"The split {name!r} has no rows: pick another with --dataset_train_split "
                         f"(the data has {list(dataset)}).")
    return name


def check_args(script_args, training_args, model_args, dataset_args=None) -> None:
    """Bad arguments, found before anything loads (`reflectune sft` exits 2 on them)."""
    if not model_args.model_name_or_path:
        raise ValueError("Set --model_name_or_path (an embedded alias such as smollm2-135m-instruct, a Hub id or "
                         "a local directory), or `model_name_or_path:` in the --config file.")


def dataset_label(script_args, dataset_args) -> str:
    """What the model card names as the data: the Hub id or path, or the mixture's sources."""
    if dataset_args is None or not dataset_args.datasets:
        return script_args.dataset_name
    names = []
    for source in dataset_args.datasets:
        files = source.data_files
        files = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else files
        names.append(source.path + (f" ({', '.join(os.path.basename(str(f)) for f in files)})" if files else ""))
    return " + ".join(names)


def run_sft(script_args, training_args, model_args, dataset_args=None):
    """Train, save (weights, tokenizer with the template, model card, trainer state) and push if asked."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config, get_quantization_config

    from ..training.sft import PAPER_GLOBAL_BATCH_SIZE, vicuna_sft_trainer

    check_args(script_args, training_args, model_args, dataset_args)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    global_batch = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                    * training_args.world_size)
    if global_batch != PAPER_GLOBAL_BATCH_SIZE:
        logger.warning("Global batch is %d (per-device %d x accumulation %d x %d processes); the paper used %d.",
                       global_batch, training_args.per_device_train_batch_size,
                       training_args.gradient_accumulation_steps, training_args.world_size, PAPER_GLOBAL_BATCH_SIZE)

    dataset = load_datasets(script_args, dataset_args)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(f"The data has no split {script_args.dataset_test_split!r} to evaluate on, only "
                             f"{list(dataset)}: set --dataset_test_split, or --eval_strategy no.")
        eval_dataset = dataset[script_args.dataset_test_split]
    trainer = vicuna_sft_trainer(
        model_args.model_name_or_path,
        dataset[train_split(dataset, script_args.dataset_train_split)],
        training_args,
        eval_dataset=eval_dataset,
        dataset_name=dataset_label(script_args, dataset_args),
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)  # weights, tokenizer with the template, README.md card
    trainer.save_state()  # trainer_state.json with the loss history
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")

    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


DESCRIPTION = ("Fine-tune with TRL's SFTTrainer, the Vicuna v1.1 template and the paper's recipe as defaults; "
               "Alpaca rows, reflectune output folders and embedded model aliases are accepted.")
OUR_FLAGS = {  # shown first in `reflectune sft --help`, with what they mean here; TRL's flags follow
    "model_name_or_path": "the model to fine-tune: an embedded alias (smollm2-135m-instruct), a Hub id or a local "
                          "directory",
    "dataset_name": "'sample' (the bundled 40 rows), a folder written by reflectune, a JSON/JSONL/Parquet/CSV file "
                    "or a Hub id; Alpaca rows become `messages`",
    "dataset_train_split": "split to train on; a reflectune output folder without `train` trains on `selected`",
    "output_dir": None,
    "learning_rate": "the paper's recipe: learning rate",
    "num_train_epochs": "the paper's recipe: epochs",
    "per_device_train_batch_size": "the paper's recipe: a global batch of 128 (per device x accumulation x processes)",
    "gradient_accumulation_steps": "the paper's recipe: a global batch of 128 (per device x accumulation x processes)",
    "max_length": "the paper's recipe: tokens per example",
    "warmup_steps": "the paper's recipe: warm-up (below 1: a fraction of the steps)",
    "lr_scheduler_type": "the paper's recipe: learning-rate schedule",
    "weight_decay": "the paper's recipe: weight decay",
    "assistant_only_loss": "the paper's recipe: loss on the assistant's tokens only",
    "chat_template_path": "the Vicuna v1.1 chat template (the packaged one by default)",
    "bf16": "bf16 mixed precision (on where a bf16-capable GPU is visible)",
}


def make_parser(subparsers: argparse._SubParsersAction = None, prog: str = None):
    """TRL's `sft` arguments with the paper's recipe as defaults; our flags come first in the help."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig

    from ..training.sft import batch_size_fields, paper_hyperparameters
    from .arguments import first_group, trl_command_parser

    dataclass_types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("sft", help="Vicuna v1.1 SFT", dataclass_types=dataclass_types)
    else:
        parser = trl_command_parser(dataclass_types, prog=prog, description=DESCRIPTION)
    # The paper's recipe as defaults; a --config file and the command line override them.
    paper = {**paper_hyperparameters(), **batch_size_fields()}
    parser.set_defaults_with_config(**paper)
    parser._optionals.title = "TRL's SFT options (trl sft)"
    first_group(parser, "reflectune: data, model and the paper's recipe", {"help": None, "config": None, **OUR_FLAGS})
    return parser
