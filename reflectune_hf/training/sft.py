"""Fine-tuning on (recycled) Alpaca data with TRL's `SFTTrainer` and the Vicuna v1.1 template.

The method trains with FastChat's `vicuna_v1.1` conversation, loss on the assistant tokens only,
global batch 128, lr 2e-5, 3 epochs, max length 2048, warmup 0.03, no weight decay, cosine
schedule (REFERENCE.md §8). Here that is plain TRL:

- `reflectune_hf/chat_templates/vicuna_v1.1.jinja` renders byte-identically to FastChat and marks
  `' ' + answer + eos_token` of every assistant turn with `{% generation %}`, so TRL's
  `assistant_only_loss=True` trains exactly those tokens. BOS: the template writes the tokenizer's
  `bos_token` first, and `apply_chat_template` / TRL tokenize with `add_special_tokens=False`, so a
  Llama-family tokenizer gets exactly one BOS, as in FastChat's training; a tokenizer without a
  BOS token gets none; SmolLM2 declares `<|im_start|>` as BOS (never added to plain text) and gets
  that one token as a prefix, the same in training and at inference.
- `to_messages` (in `sft_data`, with the checks that run before training) maps Alpaca rows to a `messages` column (the input joined into the user turn as in
  the Vicuna scoring template), which TRL reads as a conversational dataset: a dataset saved with
  that column trains unchanged with `trl sft --config` and `chat_template_path` set to the template.
- `vicuna_sft_config` gives an `SFTConfig` with the paper's hyperparameters; `vicuna_sft_trainer`
  checks the data (a clear error before any model loads) and builds the trainer, whose saved
  directory holds the chat template and a model card rendered from `cards/model_card.md`.

Example:
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.training.sft import vicuna_sft_config, vicuna_sft_trainer
    >>> args = vicuna_sft_config("out", max_steps=2, max_length=256, per_device_train_batch_size=4,
    ...                          gradient_accumulation_steps=1, activation_checkpointing=False)
    >>> trainer = vicuna_sft_trainer("smollm2-135m-instruct", load_sample().select(range(8)), args)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> trainer.save_model("out")  # weights, tokenizer with the template, README.md  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Mapping, Optional

from ..models import resolve_model
from .sft_data import STAGE, check_sft_dataset, prepare_sft_dataset, to_messages  # noqa: F401  (public here too)

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "vicuna_v1.1"
PAPER_GLOBAL_BATCH_SIZE = 128
DEFAULT_PER_DEVICE_BATCH_SIZE = 4


# ---------------------------------------------------------------------------------------------
# The chat template
# ---------------------------------------------------------------------------------------------


def _packaged(name: str) -> Path:
    return Path(str(resources.files("reflectune_hf").joinpath("chat_templates", f"{name}.jinja")))


def chat_template_path(name: str = TEMPLATE_NAME) -> Path:
    """Path of a packaged chat template (`reflectune_hf/chat_templates/<name>.jinja`).

    Example:
        >>> from reflectune_hf.training.sft import chat_template_path
        >>> chat_template_path().name
        'vicuna_v1.1.jinja'
    """
    if not _packaged(name).is_file():
        raise FileNotFoundError(f"No packaged chat template {name!r} (looked for {_packaged(name)})")
    return _packaged(name)


def vicuna_chat_template() -> str:
    """The Vicuna v1.1 Jinja chat template, for `tokenizer.chat_template = ...`."""
    return chat_template_path().read_text(encoding="utf-8")


def resolve_chat_template_path(path: Optional[str]) -> str:
    """`chat_template_path` for `SFTConfig`: `None` or a packaged template's name (`"vicuna_v1.1"`,
    or a path ending in `vicuna_v1.1.jinja` that does not exist here, such as the repo-relative
    path in the recipes when run elsewhere) gives the packaged file; anything else is kept."""
    if path is None:
        return str(chat_template_path())
    text = str(path)
    packaged = _packaged(Path(text).name.removesuffix(".jinja"))
    return str(packaged) if not os.path.exists(text) and packaged.is_file() else text


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _bf16_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch


def paper_hyperparameters() -> dict:
    """The method's training hyperparameters as `SFTConfig` fields (batch size aside).

    `warmup_steps=0.03` is a ratio (transformers 5 reads a float below 1 as a fraction of the
    steps). bf16 is on where a bf16-capable GPU is visible, as in the paper; off on CPU.
    """
    return {
        "learning_rate": 2e-5,
        "num_train_epochs": 3,
        "max_length": 2048,
        "warmup_steps": 0.03,
        "weight_decay": 0.0,
        "lr_scheduler_type": "cosine",
        "assistant_only_loss": True,
        "packing": False,
        "chat_template_path": str(chat_template_path()),
        "activation_checkpointing": True,
        "bf16": _bf16_available(),
    }


def batch_size_fields(global_batch_size: int = PAPER_GLOBAL_BATCH_SIZE,
                      per_device_train_batch_size: int = DEFAULT_PER_DEVICE_BATCH_SIZE,
                      world_size: Optional[int] = None) -> dict:
    """`per_device_train_batch_size` and `gradient_accumulation_steps` giving `global_batch_size`
    on `world_size` processes (default: `WORLD_SIZE`, set by torchrun / accelerate launch, else 1).

    Example:
        >>> from reflectune_hf.training.sft import batch_size_fields
        >>> batch_size_fields(128, 4, world_size=8)
        {'per_device_train_batch_size': 4, 'gradient_accumulation_steps': 4}
    """
    world = world_size or _world_size()
    per_step = per_device_train_batch_size * world
    if global_batch_size % per_step:
        raise ValueError(
            f"The global batch {global_batch_size} is not a multiple of per_device_train_batch_size x processes = "
            f"{per_device_train_batch_size} x {world}; choose a per-device batch size that divides it.")
    return {"per_device_train_batch_size": per_device_train_batch_size,
            "gradient_accumulation_steps": global_batch_size // per_step}


def vicuna_sft_config(output_dir: Optional[str] = None, *, global_batch_size: int = PAPER_GLOBAL_BATCH_SIZE,
                      world_size: Optional[int] = None, **overrides):
    """A `trl.SFTConfig` with the paper's hyperparameters as defaults (REFERENCE.md §8).

    The global batch of 128 is `per_device_train_batch_size` (default 4) x
    `gradient_accumulation_steps` x the number of processes (`WORLD_SIZE`, set by `torchrun` and
    `accelerate launch`; 1 otherwise): the accumulation is derived so the product is
    `global_batch_size`, unless you pass `gradient_accumulation_steps` yourself. Any `SFTConfig`
    field may be overridden by keyword.

    Example:
        >>> from reflectune_hf.training.sft import vicuna_sft_config
        >>> args = vicuna_sft_config("out", world_size=8)
        >>> args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate
        (4, 4, 2e-05)
        >>> args.assistant_only_loss, args.max_length, args.lr_scheduler_type.value
        (True, 2048, 'cosine')
    """
    from trl import SFTConfig

    per_device = overrides.pop("per_device_train_batch_size", DEFAULT_PER_DEVICE_BATCH_SIZE)
    if "gradient_accumulation_steps" in overrides:
        batch = {"per_device_train_batch_size": per_device,
                 "gradient_accumulation_steps": overrides.pop("gradient_accumulation_steps")}
    else:
        batch = batch_size_fields(global_batch_size, per_device, world_size)
    params = {**paper_hyperparameters(), **batch, **overrides}
    params["chat_template_path"] = resolve_chat_template_path(params["chat_template_path"])
    if output_dir is not None:
        params["output_dir"] = str(output_dir)
    return SFTConfig(**params)


# ---------------------------------------------------------------------------------------------
# Trainer and model card
# ---------------------------------------------------------------------------------------------


@functools.cache
def _trainer_class():
    from trl import SFTTrainer

    class VicunaSFTTrainer(SFTTrainer):
        """`SFTTrainer` whose `save_model` and `push_to_hub` write the reflectune_hf model card."""

        def __init__(self, *args, base_model_name: Optional[str] = None, dataset_name: Optional[str] = None,
                     num_rows: Optional[int] = None, **kwargs):
            super().__init__(*args, **kwargs)
            # The card counts the rows that train (`num_rows` passed in, less those TRL dropped). Packed,
            # the dataset holds sequences of several rows, and TRL drops none.
            trained = None if num_rows is None else num_rows if self.args.packing else len(self.train_dataset)
            self.card_info = {"base_model": base_model_name, "dataset": dataset_name, "rows": trained,
                              "dropped_rows": None if num_rows is None else num_rows - trained}

        def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
            super().save_model(output_dir, _internal_call=_internal_call)
            if not _internal_call and self.is_world_process_zero():
                self.model_card().save(os.path.join(output_dir or self.args.output_dir, "README.md"))

        def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
            if self.is_world_process_zero():
                card = self.model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
                card.save(os.path.join(self.args.output_dir, "README.md"))

        def model_card(self, model_name=None, dataset_name=None, tags=None):
            from ..sanitize import public_name
            from .model_card import render_model_card

            # The card names the template that trained: another `chat_template_path` is not Vicuna's.
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            vicuna = tokenizer.chat_template == vicuna_chat_template()
            name = TEMPLATE_NAME if vicuna else public_name(self.args.chat_template_path or "the tokenizer's own")
            return render_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags,
                                     template_name=name, vicuna=vicuna)

    VicunaSFTTrainer.__qualname__ = "VicunaSFTTrainer"  # importable (and picklable) as reflectune_hf.training.sft.VicunaSFTTrainer
    return VicunaSFTTrainer


def __getattr__(name):  # `VicunaSFTTrainer` is built on first use, so importing this module stays light
    if name == "VicunaSFTTrainer":
        return _trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log_truncation(prepared, n_rows: int, args, name: str = "train") -> None:
    """Say how many of the `n_rows` rows of `name` TRL dropped (their prompt fills max_length) or cut."""
    import pyarrow.compute as pc

    max_length = args.max_length
    if args.packing:  # rows packed into fewer sequences, none dropped
        logger.info("%s: %d %s rows packed into %d sequences of up to max_length=%s tokens", STAGE, n_rows, name,
                    len(prepared), max_length)
    elif n_rows != len(prepared):
        logger.warning("%s: %d of %d %s rows were dropped by TRL: their prompt alone fills max_length=%s, leaving "
                       "no assistant token to train on", STAGE, n_rows - len(prepared), n_rows, name, max_length)
    if max_length and "input_ids" in prepared.column_names and not args.packing:
        lengths = pc.list_value_length(prepared.with_format("arrow")["input_ids"])
        cut = pc.sum(pc.greater_equal(lengths, max_length)).as_py() or 0
        if cut:
            logger.warning("%s: %d of %d %s rows are truncated to max_length=%d tokens", STAGE, cut, len(prepared),
                           name, max_length)


def vicuna_sft_trainer(model, train_dataset, args=None, *, eval_dataset=None, system: Optional[str] = None,
                       dataset_name: Optional[str] = None, **trainer_kwargs):
    """Build an `SFTTrainer` for Vicuna v1.1 assistant-only SFT.

    Args:
        model: an embedded alias (`"smollm2-135m-instruct"`), a Hub id, a local path, or a loaded model.
        train_dataset: Alpaca rows (`instruction`, `input`, `output`) or a `messages` dataset. It is
            checked first (`check_sft_dataset`): missing columns or empty outputs raise before any
            model is loaded.
        args: an `SFTConfig`; default `vicuna_sft_config()`. A missing `chat_template_path` is set to
            the packaged Vicuna template.
        eval_dataset: optional, same forms as `train_dataset`.
        system: a system message to put in every conversation (default: the template's Vicuna one).
        dataset_name: shown in the model card (and its metadata when it is a Hub id).
        **trainer_kwargs: passed to `SFTTrainer` (`peft_config`, `callbacks`, `processing_class`...).

    Returns:
        A `VicunaSFTTrainer` (an `SFTTrainer`); its `save_model(dir)` also writes `README.md`.
    """
    args = args if args is not None else vicuna_sft_config()
    args.chat_template_path = resolve_chat_template_path(args.chat_template_path)
    from trl.trainer.utils import global_then_local_main_first

    if model is None:
        raise ValueError(f"{STAGE}: no model to train: pass one (--model_name_or_path with `reflectune sft`), an "
                         "embedded alias such as smollm2-135m-instruct, a Hub id or a local directory")
    n_rows = len(train_dataset) if hasattr(train_dataset, "__len__") else None
    evals = (eval_dataset if isinstance(eval_dataset, Mapping) else {} if eval_dataset is None
             else {"eval": eval_dataset})
    n_eval = {name: len(ds) for name, ds in evals.items() if hasattr(ds, "__len__")}
    with global_then_local_main_first():  # as TRL prepares data: one process writes the map cache first
        train_dataset = prepare_sft_dataset(train_dataset, system=system)
        if isinstance(eval_dataset, Mapping):
            eval_dataset = {name: prepare_sft_dataset(split, system=system) for name, split in eval_dataset.items()}
        elif eval_dataset is not None:
            eval_dataset = prepare_sft_dataset(eval_dataset, system=system)
    base_model_name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if isinstance(model, str):
        model = resolve_model(model)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        base_model_name=base_model_name, dataset_name=dataset_name, num_rows=n_rows, **trainer_kwargs,
    )
    if n_rows is not None:
        _log_truncation(trainer.train_dataset, n_rows, trainer.args)
    prepared = trainer.eval_dataset if isinstance(trainer.eval_dataset, Mapping) else {"eval": trainer.eval_dataset}
    for name, rows in n_eval.items():
        _log_truncation(prepared[name], rows, trainer.args, name)
    return trainer
