"""IFD and r-IFD arithmetic (REFERENCE.md §6): the score columns of a row from its four mean
token losses. Pure functions: `ifd.IFDScorer` computes the losses.

`ppl = exp(loss)`; IFD = ppl(out_condition) / ppl(out_alone) and r-IFD = ppl(ins_condition) /
ppl(ins_alone), computed as `exp(loss difference)` so that a perplexity overflowing a float (a
served student's clamped log-probabilities) still gives its ratio; the loss ratios `ifd_loss` /
`rifd_loss` are Cherry LLM's variants. Undefined values are NaN, never 0.
"""

from __future__ import annotations

import math

LOSS_NAMES = ("ins_alone", "out_alone", "ins_condition", "out_condition")  # the reference's order
SCORE_COLUMNS = (
    *(f"loss_{n}" for n in LOSS_NAMES),
    *(f"ppl_{n}" for n in LOSS_NAMES),
    "ifd", "rifd", "ifd_loss", "rifd_loss", "score_status",
)
SCORE_FEATURES = {name: "string" if name == "score_status" else "float64" for name in SCORE_COLUMNS}


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _ppl_ratio(loss: float, base_loss: float) -> float:
    """`exp(loss) / exp(base_loss)` as `exp(loss - base_loss)`: defined where either perplexity
    overflows a float (a mean loss >= ~710, e.g. a served student's clamped log-probabilities)."""
    if not (math.isfinite(loss) and math.isfinite(base_loss)):
        return math.nan
    return _exp(loss - base_loss)


def score_columns(losses: list[list[float]], reasons: list[list[str]]) -> dict:
    """The score columns of rows from their four mean losses (`LOSS_NAMES` order, NaN where
    undefined) and the reasons found while computing them: perplexities, IFD / r-IFD (perplexity
    ratios, computed as exp of the loss difference), the loss ratios, and `score_status` (`ok`, the
    `;`-joined reasons, or `non_finite:<ifd|rifd>` for a ratio that overflows).

    Example:
        >>> from reflectune_hf.scoring.ifd_math import score_columns
        >>> out = score_columns([[2.0, 1.0, 1.5, 0.5]], [[]])
        >>> round(out["ifd"][0], 4), out["ifd_loss"], out["score_status"]
        (0.6065, [0.5], ['ok'])
    """
    columns: dict = {name: [] for name in SCORE_COLUMNS}
    for row, why in zip(losses, reasons):
        ppl = [_exp(x) if math.isfinite(x) else math.nan for x in row]
        for name, loss, p in zip(LOSS_NAMES, row, ppl):
            columns[f"loss_{name}"].append(loss)
            columns[f"ppl_{name}"].append(p)
        ifd, rifd = _ppl_ratio(row[3], row[1]), _ppl_ratio(row[2], row[0])
        columns["ifd"].append(ifd if math.isfinite(ifd) else math.nan)
        columns["rifd"].append(rifd if math.isfinite(rifd) else math.nan)
        columns["ifd_loss"].append(_ratio(row[3], row[1]))
        columns["rifd_loss"].append(_ratio(row[2], row[0]))
        if not why:  # finite losses whose ratio overflows: not a score
            why = [f"non_finite:{name}" for name, x in (("ifd", ifd), ("rifd", rifd)) if not math.isfinite(x)]
        columns["score_status"].append(";".join(why) if why else "ok")
    return columns
