"""Selection over scored variants: V1, V2 (Selective Reflection-Tuning), top-k, and predicates
for `Dataset.filter`."""

from .select import ifd_below, is_scored, rifd_below, select_v1, select_v2, top_k_by

__all__ = ["ifd_below", "is_scored", "rifd_below", "select_v1", "select_v2", "top_k_by"]
