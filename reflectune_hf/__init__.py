"""reflectune_hf: Reflection-Tuning (data recycling for instruction tuning), the Hugging Face way.

Each stage of the method is a callable for `Dataset.map` / `Dataset.filter`; configs are
dataclasses; models and oracles load lazily so datasets' cache serves repeated runs.

Example:
    >>> import reflectune_hf
    >>> ds = reflectune_hf.load_sample()
    >>> len(ds)
    40
"""

__version__ = "0.1.0"

from .data import add_ids, load_data, load_sample, to_alpaca  # noqa: E402
from .models import load_causal_lm, resolve_model  # noqa: E402

__all__ = ["__version__", "add_ids", "load_causal_lm", "load_data", "load_sample", "resolve_model", "to_alpaca"]

from .report import plot_summary, summarize  # noqa: E402
from .select import ifd_below, is_scored, rifd_below, select_v1, select_v2, top_k_by  # noqa: E402

__all__ += ["ifd_below", "is_scored", "plot_summary", "rifd_below", "select_v1", "select_v2", "summarize", "top_k_by"]

from .oracles import (  # noqa: E402
    ChatRequest, ChatResult, OpenAIBatchOracle, OpenAIOracle, OracleCache, OracleConfigurationError,
    TransformersOracle, estimate,
)

__all__ += ["ChatRequest", "ChatResult", "OpenAIBatchOracle", "OpenAIOracle", "OracleCache",
            "OracleConfigurationError", "TransformersOracle", "estimate"]

# Tuna's data stages; TunaTrainer, TunaConfig and tuna_loss load torch: `from reflectune_hf.tuna import TunaTrainer`.
from .tuna import ContextualRank, SampleResponses, rank_by_logprob  # noqa: E402

__all__ += ["ContextualRank", "SampleResponses", "rank_by_logprob"]
