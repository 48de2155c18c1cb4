"""reflectune_hf: Reflection-Tuning (data recycling for instruction tuning), the Hugging Face way.

Each stage of the method is a callable for `Dataset.map` / `Dataset.filter`; configs are
dataclasses; models and oracles load lazily so datasets' cache serves repeated runs.

Example:
    >>> import reflectune_hf
    >>> ds = reflectune_hf.load_sample()
    >>> len(ds)
    40
"""

__version__ = "0.3.6"

from .data import add_ids, load_data, load_sample, to_alpaca  # noqa: E402
from .evaluation.stages import GenerateResponses, PairwiseJudge, judge_summary, load_eval_set, plot_judge, quality_report  # noqa: E402
from .models import load_causal_lm, resolve_model  # noqa: E402
from .oracles import (  # noqa: E402
    ChatRequest,
    ChatResult,
    LlamaCppOracle,
    OpenAIBatchOracle,
    OpenAIOracle,
    OracleCache,
    OracleConfigurationError,
    TransformersOracle,
    estimate,
)
from .publishing.report import plot_summary, summarize  # noqa: E402
from .reflection.extract import extract_instruction_reflection, extract_response_reflection  # noqa: E402
from .reflection.stages import CompressInstruction, ReflectInstruction, ReflectResponse, map_stage  # noqa: E402
from .reflection.variants import build_variants  # noqa: E402
from .scoring.ifd import IFDScorer, map_scores  # noqa: E402
from .scoring.selectit import SelectITScorer  # noqa: E402
from .selection.select import ifd_below, is_scored, rifd_below, select_v1, select_v2, top_k_by  # noqa: E402
from .training.sft import to_messages, vicuna_sft_config, vicuna_sft_trainer  # noqa: E402
# Tuna's data stages; TunaTrainer, TunaConfig and tuna_loss load torch: `from reflectune_hf.tuna.trainer import TunaTrainer`.
from .tuna.stages import ContextualRank, SampleResponses, rank_by_logprob  # noqa: E402

__all__ = [
    "__version__",
    # data and models
    "add_ids", "load_data", "load_sample", "to_alpaca", "load_causal_lm", "resolve_model",
    # oracles
    "ChatRequest", "ChatResult", "LlamaCppOracle", "OpenAIBatchOracle", "OpenAIOracle", "OracleCache",
    "OracleConfigurationError", "TransformersOracle", "estimate",
    # reflection
    "CompressInstruction", "ReflectInstruction", "ReflectResponse", "map_stage", "build_variants",
    "extract_instruction_reflection", "extract_response_reflection",
    # scoring, selection and statistics
    "IFDScorer", "map_scores",
    "ifd_below", "is_scored", "rifd_below", "select_v1", "select_v2", "top_k_by", "plot_summary", "summarize",
    # fine-tuning
    "to_messages", "vicuna_sft_config", "vicuna_sft_trainer",
    # peer methods
    "SelectITScorer", "ContextualRank", "SampleResponses", "rank_by_logprob",
    # evaluation
    "GenerateResponses", "PairwiseJudge", "judge_summary", "load_eval_set", "plot_judge", "quality_report",
]
