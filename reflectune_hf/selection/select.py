"""Selection: V1 (recycled), V2 (Selective Reflection-Tuning), Cherry / Superfiltering top-k,
and score predicates for `Dataset.filter` (REFERENCE.md §7).

Input columns, produced by `IFDScorer` (issue 5) and the reflection stages (issue 4):

- `id` (int): aligns the four variant splits `origin`, `reflect_instruction`,
  `reflect_response`, `reflect_both` of a `DatasetDict` (row order may differ between splits).
- `ifd`, `rifd` (float, perplexity ratios, `ratio="ppl"`, as the V2 reference code) or
  `ifd_loss`, `rifd_loss` (loss ratios, `ratio="loss"`, as Cherry LLM).
- `score_status` (str, optional): `"ok"` when the row was scored.
- `reflection_status` (str, optional): the status of the last reflection step of the row, in
  `extract.STATUSES` (`ok`, `instruction_fallback`, `output_fallback`, `failed`, `truncated`,
  `empty_input`, `invalid_text`, `oracle_error`).
- `instruction`, `input` (optional), `output` (str).

What counts as a score: a *valid* score is a finite number > 0 on a row whose `score_status`
(`selectit_status` for `selectit_*` scores; when the column exists) is `"ok"`. NaN, None (Arrow
null), ±inf and values <= 0 are *missing*:
a ratio of perplexities or of mean cross-entropies is strictly positive, and 0 is the failure
marker of the reference scorer (it returned (0, 0) on any exception, which then passed every
`< 1` filter). A missing score never wins or loses a comparison: a row that needs it is simply
not selected.

Example:
    >>> from datasets import Dataset
    >>> from reflectune_hf.selection.select import ifd_below, top_k_by
    >>> ds = Dataset.from_dict({"id": [0, 1, 2, 3], "ifd": [0.9, float("nan"), 1.2, 0.4]})
    >>> list(ds.filter(ifd_below(1.0))["id"])
    [0, 3]
    >>> list(top_k_by(ds, "ifd", k=1)["id"])
    [0]
"""

from __future__ import annotations

import logging
import math
from numbers import Real
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..data import ID_COLUMN, ColumnError, arrow_columns, empty_dataset, require_columns, text_array
from ..reflection.extract import NOT_REFLECTED as EXTRACT_NOT_REFLECTED
from ..reflection.variants import VARIANT_SPLITS, align_by_id, check_variants, unify_schema
from ..utils import LazyState

logger = logging.getLogger(__name__)

RATIO_COLUMNS = {"ppl": ("ifd", "rifd"), "loss": ("ifd_loss", "rifd_loss")}
SCORE_STATUS_COLUMN = "score_status"
SCORE_OK = "ok"
SELECTIT_STATUS_COLUMN = "selectit_status"  # SelectITScorer's status: the one its `selectit_*` scores answer to
STATUS_COLUMN = "reflection_status"
SELECTED_SPLIT = "selected"  # the split of the chosen rows that the jobs add next to the variants
# Statuses of the response-reflection step meaning "the response was not rewritten": the row
# still holds the previous response (fallback) or the oracle gave nothing usable.
NOT_REFLECTED = EXTRACT_NOT_REFLECTED  # output_fallback, failed, truncated, empty_input, invalid_text, oracle_error
# Statuses of the instruction-reflection step meaning "no new instruction": its split holds the
# origin's instruction (input merged into it by some stages; with `instruction_fallback` next to
# the answer written for the lost new one), never a phase-1 candidate.
INSTRUCTION_NOT_REFLECTED = (NOT_REFLECTED - {"output_fallback"}) | {"instruction_fallback"}
# Outcomes of the V2 decision per id, in the order the checks apply (see `explain_v2`).
V2_REJECTIONS = ("missing_score", "not_improved", "not_reflected", "above_one")
V2_SOURCES = ("reflect_response", "reflect_both")


def ratio_columns(ratio: str) -> tuple[str, str]:
    """The (IFD, r-IFD) column names for `ratio="ppl"` or `ratio="loss"`."""
    if ratio not in RATIO_COLUMNS:
        raise ValueError(f"ratio must be one of {sorted(RATIO_COLUMNS)}, got {ratio!r}")
    return RATIO_COLUMNS[ratio]


def valid_scores(values) -> np.ndarray:
    """Boolean mask of valid scores: finite and > 0 (NaN, inf, 0 and negatives are missing).

    Example:
        >>> from reflectune_hf.selection.select import valid_scores
        >>> valid_scores([0.7, float("nan"), 0.0, float("inf"), 1.3]).tolist()
        [True, False, False, False, True]
    """
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values > 0)


def status_column(column: str) -> str:
    """The status column of a score column: `selectit_status` for `selectit_*`, else `score_status`."""
    return SELECTIT_STATUS_COLUMN if column.startswith("selectit_") else SCORE_STATUS_COLUMN


def _scores(table: pa.Table, column: str, stage: str) -> np.ndarray:
    arr = table[column]
    if not (pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_null(arr.type)):
        raise ColumnError(f"{stage}: score column {column!r} must be numeric, got {arr.type}")
    values = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64, copy=True)
    if status_column(column) in table.column_names:
        ok = pc.fill_null(pc.equal(pc.cast(table[status_column(column)], pa.string()), SCORE_OK), False)
        values[~ok.to_numpy(zero_copy_only=False)] = np.nan
    return values


def score_array(ds, column: str, stage: str = "score_array") -> np.ndarray:
    """A numeric column as float64 numpy, nulls as NaN, NaN where its status (`status_column`) is not ok.

    Raises `ColumnError` when the column is missing or not numeric.
    """
    require_columns(ds, [column], stage)
    status = [status_column(column)] if status_column(column) in ds.column_names else []
    return _scores(arrow_columns(ds, [column, *status]), column, stage)


# --------------------------------------------------------------------------- predicates


class ScoreFilter(LazyState):  # LazyState: pickled (so hashed) with the package version
    """A predicate for `Dataset.filter`, plain or `batched=True`: every column in `columns` holds a
    valid score (see the module docstring) and, when `below` is set, a value `< below`; rows whose
    status (`status_column`: `score_status`, `selectit_status` for SelectIT's) is not `"ok"` are rejected.

    Built by `ifd_below`, `rifd_below` and `is_scored`; picklable, so the filter is cached.
    """

    def __init__(self, columns: Sequence[str], below: Optional[float] = None):
        self.columns = tuple(columns)
        self.below = None if below is None else float(below)

    def __repr__(self) -> str:
        return f"ScoreFilter(columns={self.columns!r}, below={self.below!r})"

    def __call__(self, example: dict):
        require_columns(example, self.columns, repr(self))
        batched = isinstance(example[self.columns[0]], (list, tuple, np.ndarray))

        def col(name):
            return example[name] if batched else [example[name]]

        keep = np.ones(len(col(self.columns[0])), dtype=bool)
        for name in self.columns:
            raw = col(name)
            bad = [v for v in raw if v is not None
                   and (isinstance(v, bool) or not isinstance(v, (int, float, np.number)))]
            if bad:
                raise ColumnError(f"{self!r}: score column {name!r} must be numeric, got {bad[0]!r:.40}")
            values = np.array([np.nan if v is None else v for v in raw], dtype=np.float64)
            keep &= valid_scores(values) & (True if self.below is None else values < self.below)
        for status in sorted({status_column(name) for name in self.columns} & set(example)):
            keep &= np.array([s == SCORE_OK for s in col(status)], dtype=bool)
        return keep.tolist() if batched else bool(keep[0])


def ifd_below(threshold: float = 1.0, column: str = "ifd") -> ScoreFilter:
    """Keep rows whose IFD is a valid score `< threshold` (Cherry's "IFD < 1" filter).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.selection.select import ifd_below
        >>> list(Dataset.from_dict({"ifd": [0.5, 1.5, None, 0.0]}).filter(ifd_below())["ifd"])
        [0.5]
    """
    return ScoreFilter([column], below=threshold)


def rifd_below(threshold: float = 1.0, column: str = "rifd") -> ScoreFilter:
    """Keep rows whose r-IFD is a valid score `< threshold`.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.selection.select import rifd_below
        >>> list(Dataset.from_dict({"rifd": [0.5, 1.5]}).filter(rifd_below(), batched=True)["rifd"])
        [0.5]
    """
    return ScoreFilter([column], below=threshold)


def is_scored(columns: Sequence[str] = ("ifd", "rifd")) -> ScoreFilter:
    """Keep rows where every column of `columns` holds a valid score (finite, > 0, status ok).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.selection.select import is_scored
        >>> ds = Dataset.from_dict({"ifd": [0.5, float("nan")], "rifd": [0.7, 0.8]})
        >>> len(ds.filter(is_scored()))
        1
    """
    return ScoreFilter(columns)


# --------------------------------------------------------------------------- variants


def _same(a: pa.Array, b: pa.Array) -> np.ndarray:
    return pc.equal(a, b).to_numpy(zero_copy_only=False).astype(bool)


def _v2_decide(variants, require_below_one: bool, ratio: str, stage: str):
    """The V2 decision for every id of `origin`: (positions, kept-Q mask, outcome array)."""
    ifd_col, rifd_col = ratio_columns(ratio)
    for split in VARIANT_SPLITS:  # the usual cause of missing scores on an empty split: say so
        ds = variants[split] if split in variants else None
        if ds is not None and len(ds) == 0 and not {ifd_col, rifd_col} <= set(ds.column_names):
            raise ColumnError(f"{stage} (split {split!r}) has 0 rows and no {ifd_col!r}/{rifd_col!r} columns: "
                              "datasets' map does not call a scorer on 0 rows. Score with "
                              "reflectune_hf.map_scores(variants, IFDScorer(...)), which adds them.")
    check_variants(variants, [ID_COLUMN, "instruction", "output", ifd_col, rifd_col], stage)
    optional = ["input", SCORE_STATUS_COLUMN, STATUS_COLUMN]
    tables = {s: arrow_columns(variants[s], [ID_COLUMN, "instruction", "output", ifd_col, rifd_col]
                        + [c for c in optional if c in variants[s].column_names]) for s in VARIANT_SPLITS}
    pos = align_by_id({s: t[ID_COLUMN].to_numpy() for s, t in tables.items()}, stage)
    ifd = {s: _scores(t, ifd_col, f"{stage} (split {s!r})")[pos[s]] for s, t in tables.items()}
    rifd = {s: _scores(t, rifd_col, f"{stage} (split {s!r})")[pos[s]] for s, t in tables.items()}
    text = {s: {c: text_array(t, c).take(pa.array(pos[s])) for c in ("instruction", "input", "output")}
            for s, t in tables.items()}
    ori, q, a, qa = VARIANT_SPLITS

    def status_in(split: str, statuses) -> np.ndarray:
        if STATUS_COLUMN not in tables[split].column_names:
            return np.zeros(len(pos[split]), dtype=bool)
        status = pc.cast(tables[split][STATUS_COLUMN].take(pa.array(pos[split])), pa.string())
        return pc.fill_null(pc.is_in(status, pa.array(sorted(statuses))), False).to_numpy(zero_copy_only=False)

    # Phase 1, instruction: keep Q when its IFD is higher. A Q whose instruction reflection fell
    # back or failed (its status says so, or its text is the origin's) is the origin: float noise,
    # or the input merged into the instruction, must not pick it.
    phase1_scored = valid_scores(ifd[ori]) & valid_scores(ifd[q])
    q_copy = _same(text[q]["instruction"], text[ori]["instruction"]) & _same(text[q]["input"], text[ori]["input"])
    q_copy &= _same(text[q]["output"], text[ori]["output"])
    q_copy |= status_in(q, INSTRUCTION_NOT_REFLECTED)
    keep_q = phase1_scored & (ifd[q] > ifd[ori]) & ~q_copy

    # Phase 2, response: the kept pair (Q or ori) against its response-reflected twin (QA or A).
    kept_rifd = np.where(keep_q, rifd[q], rifd[ori])
    twin_rifd = np.where(keep_q, rifd[qa], rifd[a])
    twin_ifd = np.where(keep_q, ifd[qa], ifd[a])
    scored = phase1_scored & valid_scores(kept_rifd) & valid_scores(twin_rifd) & valid_scores(twin_ifd)
    improved = twin_rifd < kept_rifd

    # "Rows whose response is not reflected are discarded": the twin wins only if its response
    # really was rewritten: its status is not a response fallback/failure and its text differs.
    def reflected(twin: str, base: str) -> np.ndarray:
        return ~_same(text[twin]["output"], text[base]["output"]) & ~status_in(twin, NOT_REFLECTED)

    twin_reflected = np.where(keep_q, reflected(qa, q), reflected(a, ori))
    below = (twin_rifd < 1) & (twin_ifd < 1) if require_below_one else np.ones(len(keep_q), dtype=bool)
    source = np.where(keep_q, "reflect_both", "reflect_response")
    outcome = np.select([~scored, ~improved, ~twin_reflected, ~below], list(V2_REJECTIONS), default=source)
    return pos, keep_q, outcome.astype(object)


def explain_v2(variants, require_below_one: bool = True, ratio: str = "ppl"):
    """The V2 decision per id, for audits and the selection funnel.

    Returns a Dataset in `origin` order with `id`, `v2_kept` (`"reflect_instruction"` when phase 1
    kept the reflected instruction, else `"origin"`) and `v2_outcome`: the chosen split
    (`"reflect_response"` / `"reflect_both"`) or the first reason it was rejected, checked in this
    order: `missing_score`, `not_improved` (the twin's r-IFD is not lower), `not_reflected`,
    `above_one` (only with `require_below_one`).

    Example:
        >>> from datasets import Dataset, DatasetDict
        >>> from reflectune_hf.selection.select import VARIANT_SPLITS, explain_v2
        >>> one = Dataset.from_dict({"id": [7], "instruction": ["q"], "output": ["a"], "ifd": [0.5], "rifd": [None]})
        >>> list(explain_v2(DatasetDict({s: one for s in VARIANT_SPLITS}))["v2_outcome"])
        ['missing_score']
    """
    from datasets import Dataset

    pos, keep_q, outcome = _v2_decide(variants, require_below_one, ratio, "explain_v2")
    ids = arrow_columns(variants["origin"], [ID_COLUMN])[ID_COLUMN].to_numpy()
    kept = np.where(keep_q, "reflect_instruction", "origin")
    return Dataset.from_dict({ID_COLUMN: ids, "v2_kept": kept.tolist(), "v2_outcome": outcome.tolist()})


def _with_source(ds, source: str):
    if "source" in ds.column_names:  # all null: what a saved folder's variant splits hold (one schema with `selected`)
        if arrow_columns(ds, ["source"])["source"].null_count < len(ds):
            raise ColumnError(f"{source}: the data has a 'source' column of its own, which the selection would replace "
                              "with the split a row comes from: rename it first (ds.rename_column('source', ...))")
        ds = ds.remove_columns("source")
    return ds.add_column("source", [source] * len(ds))


def select_v2(variants, require_below_one: bool = True, ratio: str = "ppl"):
    """Selective Reflection-Tuning (V2): per `id`, choose the response-reflected pair or nothing.

    With ori = `origin` (x0, y0), Q = `reflect_instruction` (x1, y1), A = `reflect_response`
    (x0, ya), QA = `reflect_both` (x1, yqa), for each id:

    1. Instruction phase: keep Q if IFD(Q) > IFD(ori), else keep ori.
    2. Response phase: the kept pair's twin (QA for Q, A for ori) is selected if its r-IFD is
       lower than the kept pair's r-IFD; otherwise the row is discarded (the reference keeps a
       pair only in its response-reflected form).
    3. `require_below_one=True` (the reference code) also requires r-IFD < 1 and IFD < 1 on the
       selected twin; `False` is the paper's form.

    What our data model adds (the reference has neither missing scores, only its 0-on-error,
    nor statuses, and compares floats that batching noise could tip):

    - Missing scores (see the module docstring) make the row unselectable: the five scores its
      path reads (IFD of ori and Q, r-IFD of the kept pair and of its twin, the twin's IFD) must
      be valid. NaN never wins a comparison by accident.
    - "Rows whose response is not reflected are discarded": a twin whose `reflection_status` is
      in `NOT_REFLECTED` (`output_fallback`, `failed`, `truncated`, `empty_input`, `invalid_text`,
      `oracle_error`), or whose `output` equals the kept pair's
      `output`, is never selected (it is the kept pair, not a reflected response).
    - A Q identical to ori (instruction, input and output), or whose `reflection_status` says its
      instruction was not reflected (`INSTRUCTION_NOT_REFLECTED`: `instruction_fallback`,
      `failed`, `truncated`, `empty_input`, `invalid_text`, `oracle_error`), never wins phase 1.

    Args:
        variants: a `DatasetDict` with the four splits, aligned by `id` (order may differ), each
            with `instruction`, `output` and the score columns.
        require_below_one: the reference code's extra `< 1` checks.
        ratio: `"ppl"` reads `ifd`/`rifd`, `"loss"` reads `ifd_loss`/`rifd_loss`.

    Returns:
        A Dataset of the selected rows in `origin` order, with every column of the chosen split
        (the chosen `instruction`/`input`/`output`, scores, statuses) plus `source` in
        {`reflect_response`, `reflect_both`}.

    Example:
        >>> from datasets import Dataset, DatasetDict
        >>> from reflectune_hf.selection.select import select_v2
        >>> def split(out, ifd, rifd):
        ...     return Dataset.from_dict({"id": [0], "instruction": ["q"], "output": [out],
        ...                               "ifd": [ifd], "rifd": [rifd]})
        >>> v = DatasetDict(origin=split("a", 0.5, 0.6), reflect_instruction=split("a", 0.5, 0.6),
        ...                 reflect_response=split("b", 0.7, 0.4), reflect_both=split("b", 0.7, 0.4))
        >>> list(select_v2(v)["source"])
        ['reflect_response']
    """
    from datasets import concatenate_datasets

    pos, _, outcome = _v2_decide(variants, require_below_one, ratio, "select_v2")
    parts = list(unify_schema({s: _with_source(variants[s], s) for s in V2_SOURCES}, "select_v2").values())
    # One indices mapping over [A; QA], in origin order: no copy of the rows.
    offset = np.where(outcome == V2_SOURCES[1], len(parts[0]), 0)
    row_in_split = np.where(outcome == V2_SOURCES[1], pos[V2_SOURCES[1]], pos[V2_SOURCES[0]])
    chosen = np.flatnonzero(np.isin(outcome, V2_SOURCES))
    return _take(concatenate_datasets(parts), offset[chosen] + row_in_split[chosen])


def _take(ds, indices):
    """`ds.select(indices)`; for no index, a clean 0-row Dataset with the schema (an empty
    selection of a concatenated dataset rejects `add_column` in datasets)."""
    return ds.select(indices) if len(indices) else empty_dataset(ds.features)


def select_v1(variants):
    """Reflection-Tuning V1 (Recycled): the `reflect_both` split, every row and status kept, with
    `source="reflect_both"`. Filter afterwards on `reflection_status` if you only want rows the
    oracle really rewrote.

    Example:
        >>> from datasets import Dataset, DatasetDict
        >>> from reflectune_hf.selection.select import select_v1
        >>> one = Dataset.from_dict({"id": [0], "instruction": ["q"], "output": ["a"]})
        >>> v = DatasetDict({s: one for s in ("origin", "reflect_instruction", "reflect_response", "reflect_both")})
        >>> list(select_v1(v)["source"])
        ['reflect_both']
    """
    check_variants(variants, [ID_COLUMN], "select_v1")
    return _with_source(variants["reflect_both"], "reflect_both")


def top_k_by(ds, column: str = "ifd", k: Optional[int] = None, fraction: Optional[float] = None,
             max_value: Optional[float] = 1.0, keep_order: bool = False):
    """Cherry LLM / Superfiltering selection: drop missing scores and scores above `max_value`,
    sort by `column` descending (ties keep their input order) and take the first `k` rows, or
    `ceil(fraction * len(ds))`, `len(ds)` the *given* dataset's size (Superfiltering hard-codes
    52,002), rounded up so that a fraction never selects 0 of some eligible rows. Neither `k`
    nor `fraction`: every remaining row, sorted.

    Args:
        ds: a Dataset with the score column.
        column: the score to rank by (`ifd`, `rifd`, `ifd_loss`...).
        k: number of rows to keep (at most the number of valid rows).
        fraction: share of `len(ds)` to keep, in (0, 1], rounded up to a whole row.
        max_value: drop scores above it (kept: equal); `None` keeps every valid score.
        keep_order: return the chosen rows in input order instead of score order.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.selection.select import top_k_by
        >>> ds = Dataset.from_dict({"ifd": [0.2, 0.9, 1.3, None, 0.6, 0.9]})
        >>> list(top_k_by(ds, fraction=0.5)["ifd"])
        [0.9, 0.9, 0.6]
        >>> list(top_k_by(ds, fraction=0.05)["ifd"])   # 0.3 of a row rounds up to one
        [0.9]
    """
    from datasets import Dataset

    if not isinstance(ds, Dataset):
        raise TypeError(f"top_k_by: ds must be a datasets.Dataset, got {type(ds).__name__} (pick a split first)")
    for name, value, kind in (("k", k, (int, np.integer)), ("fraction", fraction, Real),
                              ("max_value", max_value, Real)):
        if value is not None and (isinstance(value, (bool, np.bool_)) or not isinstance(value, kind)):
            what = "an int" if name == "k" else "a number"
            raise TypeError(f"top_k_by: {name} must be {what} or None, got {type(value).__name__} {value!r}")
    if k is not None and fraction is not None:
        raise ValueError("top_k_by: give k or fraction, not both")
    if k is not None and k < 0:
        raise ValueError(f"top_k_by: k must be >= 0, got {k!r}")
    if fraction is not None and not (0 < fraction <= 1):
        raise ValueError(f"top_k_by: fraction must be in (0, 1], got {fraction!r}")
    scores = score_array(ds, column, "top_k_by")
    ok = valid_scores(scores)
    if max_value is not None:
        ok &= scores <= max_value
    candidates = np.flatnonzero(ok)
    ranked = candidates[np.argsort(-scores[candidates], kind="stable")]
    if fraction is not None:
        k = math.ceil(len(ds) * fraction - 1e-9)  # rounded up: > 0 rows whenever len(ds) > 0
    chosen = ranked if k is None else ranked[:k]
    if keep_order:
        chosen = np.sort(chosen)
    return _take(ds, chosen)
