"""`reflectune tuna` (`cli.tuna_job`): the CPU smoke recipe end to end through its wrapper scripts/tuna.py (local
SmolLM2 teacher, ranking, one training step), and bad data refused."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    """scripts/tuna.py, the thin wrapper around `reflectune_hf.cli.tuna_job`."""
    spec = importlib.util.spec_from_file_location("tuna_script", REPO / "scripts" / "tuna.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.slow
def test_smoke_recipe_ranks_trains_and_saves(tmp_path, smollm2_dir):
    script = load_script()
    script_args, training_args, model_args = script.make_parser().parse_args_and_config([
        "--config", str(REPO / "scripts" / "configs" / "tuna_smoke_cpu.yaml"), "--output_dir", str(tmp_path / "out"),
        "--max_samples", "2", "--max_steps", "1", "--per_device_train_batch_size", "1", "--sample_max_tokens", "12",
        "--ranked_dataset_path", str(tmp_path / "ranked"), "--mix_original", "true", "--disable_tqdm", "true",
    ])
    assert (training_args.learning_rate, training_args.max_length, training_args.template) == (1e-4, 128, "alpaca")
    script.main(script_args, training_args, model_args)

    from datasets import load_from_disk

    ranked = load_from_disk(str(tmp_path / "ranked"))
    assert ranked["id"] == [0, 1] and ranked["sample_status"] == ["ok", "ok"]
    assert ranked["ranking_status"] == ["ok", "ok"] and all(len(r) == 4 for r in ranked["ranked_responses"])
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and math.isfinite(state["log_history"][0]["loss"])
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_unranked_data_without_an_oracle_is_refused(tmp_path):
    from reflectune_hf.cli import tuna_job as script

    script_args, _, _ = script.make_parser().parse_args_and_config(
        ["--config", str(REPO / "scripts" / "configs" / "tuna_smoke_cpu.yaml"), "--output_dir", str(tmp_path),
         "--oracle_model", ""])
    with pytest.raises(ValueError, match="set oracle_model"):
        script.load_ranked_data(script_args, "smollm2-135m-instruct")
