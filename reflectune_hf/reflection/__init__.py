"""Reflection-Tuning (REFERENCE.md §2-5): the oracle stages, the regex extraction of the new pairs,
the checks of a row's text, and the four aligned variants.

`stages` (compression, instruction and response reflection) -> `extract` -> `variants`.
"""

from .extract import extract_instruction_reflection, extract_response_reflection
from .stages import CompressInstruction, ReflectInstruction, ReflectResponse
from .variants import build_variants

__all__ = ["CompressInstruction", "ReflectInstruction", "ReflectResponse", "build_variants",
           "extract_instruction_reflection", "extract_response_reflection"]
