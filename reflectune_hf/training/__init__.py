"""Fine-tuning with TRL's `SFTTrainer` and the Vicuna v1.1 template (`sft`), and the trained
model's card (`model_card`)."""

from .sft import to_messages, vicuna_sft_config, vicuna_sft_trainer

__all__ = ["to_messages", "vicuna_sft_config", "vicuna_sft_trainer"]
