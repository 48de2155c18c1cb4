"""Building an oracle from a model name: the one place that picks the oracle class.

Example:
    >>> from reflectune_hf.oracles.factory import make_oracle
    >>> type(make_oracle("local:smollm2-135m-instruct", max_new_tokens=64)).__name__  # loads nothing yet
    'LlamaCppOracle'
    >>> type(make_oracle("gpt-4o-mini", base_url="http://127.0.0.1:8080/v1")).__name__
    'OpenAIOracle'
    >>> type(make_oracle("smollm2-135m-instruct", local_without_base_url=True, local_engine="transformers")).__name__
    'TransformersOracle'
"""

from __future__ import annotations

import logging
from typing import Optional

from ..sanitize import LOCAL_PREFIX
from .base import OracleConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"


def check_local_conflict(name: Optional[str], base_url: Optional[str] = None, batch_api: bool = False, *,
                         what: str = "oracle_model", url_flag: str = "base_url", **online) -> None:
    """Raise `ValueError` when a `local:<model>` name comes with `base_url`, `batch_api` or an
    option of `online` that is set (`requests_per_minute`, `tokens_per_minute`, `context_window`,
    `context_tokenizer`): all are for a model on a server; a `local:` model runs in this process
    and would silently ignore them. `what` and `url_flag` are the option names the message uses.

    Example:
        >>> from reflectune_hf.oracles.factory import check_local_conflict
        >>> check_local_conflict("gpt-4o-mini", "http://127.0.0.1:8000/v1", batch_api=True)  # a server model: fine
        >>> check_local_conflict("local:smollm2-135m-instruct", batch_api=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --batch_api is for a model on a server, but ... drop --batch_api or the local: prefix
    """
    if not name or not str(name).startswith(LOCAL_PREFIX):
        return
    given = [f"--{option}" for option, value in online.items() if value is not None]
    flag = f"--{url_flag}" if base_url else "--batch_api" if batch_api else given[0] if given else None
    if flag is not None:
        raise ValueError(f"{flag} is for a model on a server, but {what} {name!r} runs in this process: drop {flag} "
                         f"or the {LOCAL_PREFIX} prefix")


def check_batch_conflict(batch_api: bool, **options) -> None:
    """Raise `ValueError` when `batch_api` comes with an option only online requests honour
    (`requests_per_minute`, `tokens_per_minute`, `context_window`, `context_tokenizer`): the Batch
    API would ignore them silently.

    Example:
        >>> from reflectune_hf.oracles.factory import check_batch_conflict
        >>> check_batch_conflict(True, tokens_per_minute=None)  # unset: fine
        >>> check_batch_conflict(True, tokens_per_minute=1000.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --tokens_per_minute applies to online requests; the Batch API ignores it: drop it or --batch_api
    """
    given = [name for name, value in options.items() if value is not None]
    if batch_api and given:
        raise ValueError(f"--{given[0]} applies to online requests; the Batch API ignores it: drop it or --batch_api")


def make_oracle(name: str, base_url: Optional[str] = None, *, max_new_tokens: int = 512, batch_api: bool = False,
                local_batch_size: int = 8, local_engine: str = "auto", structured="auto", backend: str = "auto",
                timeout: float = 120.0, max_retries: int = 6, max_concurrency: int = 32, requests_per_minute: Optional[float] = None,
                tokens_per_minute: Optional[float] = None, context_window: Optional[int] = None,
                context_tokenizer: Optional[str] = None, local_without_base_url: bool = False):
    """The oracle called `name`.

    `local:<model>` (`local:` alone: `DEFAULT_LOCAL_MODEL`) runs the model here
    (`make_local_oracle`: llama.cpp for an embedded GGUF, transformers otherwise, or
    as `local_engine` says; with `local_batch_size`, `structured`, and twice `max_new_tokens` so a
    truncated answer's re-ask gets its doubled budget); any other
    name is a model on an OpenAI-compatible server at `base_url` (OpenAI's API when None):
    `OpenAIOracle`, or `OpenAIBatchOracle` with `batch_api=True` (which takes `timeout`,
    `max_retries`, `backend` and `structured`). `local_without_base_url=True`: a name without
    `base_url` runs here too (`reflectune eval`, the Tuna job). A blank name, a `local:` name with
    `base_url`, `batch_api` or an online-only option (`check_local_conflict`), or `batch_api` with
    an online-only option (`check_batch_conflict`) raises `ValueError`.
    """
    from .batch import OpenAIBatchOracle
    from .openai_oracle import OpenAIOracle

    if not name or not name.strip():
        raise ValueError("make_oracle: a model name is required: a name on an OpenAI-compatible server "
                         f"(with base_url for vLLM, TGI, Ollama or llama.cpp) or {LOCAL_PREFIX}<model>")
    online = dict(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute,
                  context_window=context_window, context_tokenizer=context_tokenizer)
    check_local_conflict(name, base_url, batch_api, **online)
    check_batch_conflict(batch_api, **online)
    if local_without_base_url and not base_url and not name.startswith(LOCAL_PREFIX):
        name = LOCAL_PREFIX + name
    if name.startswith(LOCAL_PREFIX):
        # The stages ask for max_new_tokens; a local oracle allows twice that, so the re-ask of an
        # answer cut by the limit (`truncated`, asked with twice the budget) really gets it.
        return make_local_oracle(name[len(LOCAL_PREFIX):] or DEFAULT_LOCAL_MODEL, engine=local_engine,
                                 batch_size=local_batch_size, max_new_tokens=2 * max_new_tokens,
                                 structured=structured)
    served = {"base_url": base_url, "timeout": timeout, "max_retries": max_retries, "backend": backend,
              "structured": structured}
    if batch_api:
        return OpenAIBatchOracle(name, **served)
    return OpenAIOracle(name, max_concurrency=max_concurrency, requests_per_minute=requests_per_minute,
                        tokens_per_minute=tokens_per_minute, context_window=context_window,
                        tokenizer=context_tokenizer, **served)


LOCAL_ENGINES = ("auto", "llamacpp", "transformers")


def make_local_oracle(model: str = "smollm2-135m-instruct", engine: str = "auto", batch_size: int = 16,
                      max_new_tokens: int = 512, structured: str = "auto", **kwargs):
    """The embedded oracle of a `local:<model>` name: `LlamaCppOracle` or `TransformersOracle`.

    Args:
        engine: "auto" (default: llama.cpp for an embedded alias or a `.gguf` file when
            llama-cpp-python imports, with one logged line when it does not; transformers for
            anything else), "llamacpp" or "transformers".
        kwargs: more arguments of the chosen oracle (e.g. `cache`).

    Example:
        >>> from reflectune_hf.oracles.factory import make_local_oracle
        >>> type(make_local_oracle("smollm2-135m-instruct", engine="transformers")).__name__
        'TransformersOracle'
    """
    from .llamacpp_local import LlamaCppOracle, is_gguf_model, llamacpp_available
    from .local import TransformersOracle

    engine = str(engine).strip().lower().replace("llama.cpp", "llamacpp")
    if engine not in LOCAL_ENGINES:
        raise ValueError(f"local_engine must be one of {list(LOCAL_ENGINES)}, got {engine!r}")
    if engine == "auto":
        if not is_gguf_model(model):
            engine = "transformers"
        elif llamacpp_available():
            engine = "llamacpp"
        else:
            logger.info("llama-cpp-python is not installed: the local oracle %s runs on transformers "
                        "(pip install 'reflectune_hf[server]' for the faster llama.cpp engine)", model)
            engine = "transformers"
    common = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "structured": structured, **kwargs}
    if engine == "transformers":
        return TransformersOracle(model=model, **common)
    if not is_gguf_model(model):
        raise ValueError(f"local_engine 'llamacpp' needs a GGUF model (an embedded alias or a .gguf file), got "
                         f"{model!r}: use local_engine 'transformers' for a transformers checkpoint")
    if not llamacpp_available():
        raise OracleConfigurationError("local_engine 'llamacpp' needs llama-cpp-python: "
                                       "pip install 'reflectune_hf[server]'")
    return LlamaCppOracle(model=model, **common)
