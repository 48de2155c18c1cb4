"""The model card of a model fine-tuned with `vicuna_sft_trainer`, from `cards/model_card.md`.

`VicunaSFTTrainer.save_model` and `push_to_hub` write it as the model's `README.md`: base model,
dataset, the recipe in effect (the hyperparameters the trainer really ran with), the chat
template with a rendered example, and the library versions. Local paths never reach the card:
a base model or dataset given as a local path (absolute or relative) shows by its folder or file
name only (`sanitize.public_name`), and only Hub ids (`owner/name`) go into the card's metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..sanitize import public_name
from ..utils import card_template, package_version


def _hub_id(name: Optional[str]) -> Optional[str]:
    """`name` when it looks like a Hub repo id (`owner/name`, not a local path), else None."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return name


def render_model_card(trainer, model_name=None, dataset_name=None, tags=None, template_name=None,
                      vicuna: bool = True):
    """The `huggingface_hub.ModelCard` of a trained model, from `cards/model_card.md`: base model,
    dataset, recipe (the hyperparameters in effect) and the chat template with a rendered example.
    `template_name` names the chat template in the card (the trainer passes its own); `vicuna`:
    whether it is the packaged Vicuna v1.1 one (else the card does not say it trained with it)."""
    import datasets
    import torch
    import transformers
    import trl
    from huggingface_hub import ModelCard, ModelCardData

    info = getattr(trainer, "card_info", {})
    args = trainer.args
    base_model = info.get("base_model") or getattr(trainer.model.config, "_name_or_path", None)
    dataset = dataset_name or info.get("dataset")
    hub_base_model, hub_dataset = _hub_id(base_model), _hub_id(dataset)  # checked before paths become names
    base_model = public_name(base_model) if base_model else base_model  # never write local paths into a card
    dataset = public_name(dataset) if dataset else dataset
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    recipe = {
        "learning rate": args.learning_rate,
        "length": f"{args.num_train_epochs} epochs" if args.max_steps <= 0 else f"{args.max_steps} steps",
        "per-device batch x accumulation x processes": f"{args.per_device_train_batch_size} x "
        f"{args.gradient_accumulation_steps} x {args.world_size} = {per_step * args.world_size}",
        "max length": args.max_length,
        "schedule": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup": args.warmup_steps,
        "weight decay": args.weight_decay,
        "loss": "assistant tokens only" if args.assistant_only_loss else "all tokens",
        "packing": args.packing,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "seed": args.seed,
    }
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    template = tokenizer.chat_template
    example = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "Who are you?"}], tokenize=False, add_generation_prompt=True)
    card_data = ModelCardData(
        base_model=hub_base_model, datasets=[hub_dataset] if hub_dataset else None,
        library_name="transformers", pipeline_tag="text-generation", model_name=model_name,
        tags=["reflectune_hf", "reflection-tuning", *(["vicuna"] if vicuna else []), "trl", "sft", *(tags or [])],
    )
    return ModelCard.from_template(
        card_data, template_path=str(card_template("model_card.md")),
        model_title=model_name or Path(args.output_dir).name, base_model_name=base_model, dataset_name=dataset,
        num_rows=info.get("rows"), dropped_rows=info.get("dropped_rows"), recipe=recipe, chat_template=template,
        rendered_example=example, vicuna=vicuna, assistant_only_loss=args.assistant_only_loss,
        template_name=template_name, hub_model_id=getattr(trainer, "hub_model_id", None) or Path(args.output_dir).name,
        versions={"reflectune_hf": package_version(), "TRL": trl.__version__, "Transformers": transformers.__version__,
                  "PyTorch": torch.__version__, "Datasets": datasets.__version__},
    )
