"""The Tuna recipes train: fp32 master weights under bf16 autocast, so lr 1e-5 steps are not rounded away.

At Tuna's learning rates an Adam step (about `lr` per weight) is far below bfloat16's resolution
(a relative step of 2^-8): weights kept in bf16 would barely move. The recipe's configuration is
parsed (`cli.tuna_job`) from `scripts/configs/tuna_probabilistic.yaml` and trained 2 steps on the embedded model
(its first 2 decoder layers; CPU, bf16 autocast as on GPU), on two short rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

from reflectune_hf.tuna.trainer import TunaTrainer

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight")


def _bf16_half_step(weights: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers at each weight: a smaller change rounds away."""
    _, exponent = torch.frexp(weights.bfloat16().float())  # w = m * 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(weights), exponent - 8) / 2  # bf16 keeps 8 significant bits


def test_probabilistic_recipe_keeps_fp32_master_weights_that_move(tmp_path, smollm2_dir):
    from reflectune_hf.cli import tuna_job as script

    _, args, model_args = script.make_parser().parse_args_and_config([
        "--config", str(REPO / "scripts" / "configs" / "tuna_probabilistic.yaml"),
        "--model_name_or_path", "smollm2-135m-instruct", "--output_dir", str(tmp_path), "--use_cpu", "true",
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--max_length", "40", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--save_strategy", "no",
        "--disable_tqdm", "true", "--activation_checkpointing", "false"])
    assert args.bf16 and args.learning_rate == 1e-5  # the recipe's precision and learning rate
    model = script.load_model(model_args)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    # Lean: the first 2 of 30 decoder layers (bf16 autocast is emulated, slowly, on most CPUs).
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:2]
    data = Dataset.from_dict({"instruction": ["Name a colour.", "Say hi."],
                              "ranked_responses": [["Blue.", "A car."], ["Hello there!", "No."]]})
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in WATCHED}
    TunaTrainer(model, args=args, train_dataset=data).train()
    for name in WATCHED:
        w0, w1 = before[name], params[name].detach()
        assert w1.dtype == torch.float32
        delta = w1 - w0
        moved = (delta != 0).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.1%} of the weights moved"
        assert 1e-6 < delta.abs().median().item() < 1e-4  # about 2 steps of lr 1e-5 each
        # The same change applied to bf16 weights is mostly rounded away: the recipe keeps it.
        lost = (delta.abs() < _bf16_half_step(w0)).float().mean().item()
        assert lost > 0.5, f"{name}: {lost:.1%}"
        kept_in_bf16 = ((w0.bfloat16().float() + delta).bfloat16() != w0.bfloat16()).float().mean().item()
        assert kept_in_bf16 < 0.5 < moved
