"""Evaluation: answer test sets (`stages.GenerateResponses`), judge pairs in both orders
(`stages.PairwiseJudge`, its arithmetic in `judge`), and data-quality statistics (`quality`)."""

from .judge import judge_summary, plot_judge
from .stages import GenerateResponses, PairwiseJudge, load_eval_set, quality_report

__all__ = ["GenerateResponses", "PairwiseJudge", "judge_summary", "load_eval_set", "plot_judge", "quality_report"]
