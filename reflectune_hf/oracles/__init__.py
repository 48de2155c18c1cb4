"""Oracles: the only part of the package that talks to an LLM service.

See `base` for the contract (`ChatRequest`, `ChatResult`, `Oracle`).
"""

from .base import ChatRequest, ChatResult, Oracle, OracleConfigurationError

__all__ = ["ChatRequest", "ChatResult", "Oracle", "OracleConfigurationError"]
