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

from typing import Optional

from ..sanitize import LOCAL_PREFIX

DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"


def make_oracle(name: str, base_url: Optional[str] = None, *, max_new_tokens: int = 512, batch_api: bool = False,
                local_batch_size: int = 8, local_engine: str = "auto", structured="auto", backend: str = "auto", timeout: float = 120.0,
                max_retries: int = 6, max_concurrency: int = 32, requests_per_minute: Optional[float] = None,
                tokens_per_minute: Optional[float] = None, context_window: Optional[int] = None,
                context_tokenizer: Optional[str] = None, local_without_base_url: bool = False):
    """The oracle called `name`.

    `local:<model>` (`local:` alone: `DEFAULT_LOCAL_MODEL`) runs the model here
    (`llamacpp_local.make_local_oracle`: llama.cpp for an embedded GGUF, transformers otherwise, or
    as `local_engine` says; with `local_batch_size`, `structured`, and twice `max_new_tokens` so a
    truncated answer's re-ask gets its doubled budget); any other
    name is a model on an OpenAI-compatible server at `base_url` (OpenAI's API when None):
    `OpenAIOracle`, or `OpenAIBatchOracle` with `batch_api=True` (which takes `timeout`,
    `max_retries`, `backend` and `structured`). `local_without_base_url=True`: a name without
    `base_url` runs here too (`reflectune eval`, the Tuna job). A blank name raises `ValueError`.
    """
    from .batch import OpenAIBatchOracle
    from .llamacpp_local import make_local_oracle
    from .openai_oracle import OpenAIOracle

    if not name or not name.strip():
        raise ValueError("make_oracle: a model name is required: a name on an OpenAI-compatible server "
                         f"(with base_url for vLLM, TGI, Ollama or llama.cpp) or {LOCAL_PREFIX}<model>")
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
