"""Tuna (REFERENCE.md §10): sampled responses and the oracle's contextual ranking (`stages`,
answers read by `parse`), then ranking-loss fine-tuning (`trainer`, which loads torch: import
`TunaTrainer` from `reflectune_hf.tuna.trainer`)."""

from .stages import ContextualRank, SampleResponses, rank_by_logprob

__all__ = ["ContextualRank", "SampleResponses", "rank_by_logprob"]
