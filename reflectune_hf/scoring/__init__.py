"""Student-model scores: IFD / r-IFD (`ifd` over the batched `engine`, checked against the
one-row `reference` algorithm) and SelectIT's uncertainty-aware self-reflection (`selectit`,
its math in `selectit_math`)."""

from .ifd import IFDScorer, map_scores
from .selectit import SelectITScorer

__all__ = ["IFDScorer", "SelectITScorer", "map_scores"]
