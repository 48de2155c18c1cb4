"""Oracles: the only part of the package that talks to an LLM service.

See `base` for the contract (`ChatRequest`, `ChatResult`, `Oracle`).
"""

from .base import ChatRequest, ChatResult, Oracle, OracleConfigurationError
from .batch import OpenAIBatchOracle
from .cache import CachingOracle, OracleCache
from .factory import make_local_oracle, make_oracle
from .llamacpp_local import LlamaCppOracle
from .local import TransformersOracle
from .openai_oracle import OpenAIOracle, RateLimiter
from .usage import UsageEstimate, estimate

__all__ = ["ChatRequest", "ChatResult", "Oracle", "OracleConfigurationError"]
__all__ += ["CachingOracle", "OpenAIBatchOracle", "OpenAIOracle", "OracleCache", "RateLimiter",
            "TransformersOracle", "UsageEstimate", "estimate"]
__all__ += ["LlamaCppOracle", "make_local_oracle", "make_oracle"]
