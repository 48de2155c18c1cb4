"""Statistics and plots of variants, scores and selection, for the dataset card and for a look
before spending GPU hours on training.

`summarize` returns a plain JSON-serialisable dict (no NaN: undefined statistics are `None`);
`plot_summary` draws PNGs from it with matplotlib's Agg canvas (no display, no pyplot state).

Example:
    >>> import json
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.publishing.report import summarize
    >>> summary = summarize(load_sample())
    >>> summary["splits"]["data"]["rows"], summary["length_unit"]
    (40, 'characters')
    >>> _ = json.dumps(summary, allow_nan=False)
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import pyarrow.compute as pc

from ..selection.select import (
    SCORE_STATUS_COLUMN,
    SELECTED_SPLIT,
    STATUS_COLUMN,
    V2_REJECTIONS,
    V2_SOURCES,
    VARIANT_SPLITS,
    explain_v2,
    ratio_columns,
    score_array,
    valid_scores,
)

from ..data import arrow_columns, text_array
from ..oracles.stage_formats import FORMAT_OUTCOMES
from ..prompts import NEWLINE_SEPARATOR, join_input
from .outputs import PLOT_FILES

logger = logging.getLogger(__name__)

QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}
SINGLE_SPLIT = "data"
FORMAT_COLUMN = "format_outcome"
TOKENIZE_CHUNK = 1024
LINESTYLES = ("-", "--", ":", "-.")


def _float(x) -> Optional[float]:
    x = float(x)
    return x if np.isfinite(x) else None


def value_stats(values: np.ndarray) -> dict:
    """count, mean, std, min, quantiles, max of finite values (None when there are none)."""
    values = values[np.isfinite(values)]
    out = {"count": int(values.size)}
    keys = ["mean", "std", "min", *QUANTILES, "max"]
    if not values.size:
        return {**out, **{k: None for k in keys}}
    qs = np.quantile(values, list(QUANTILES.values()))
    out.update(mean=_float(values.mean()), std=_float(values.std()), min=_float(values.min()))
    out.update({k: _float(q) for k, q in zip(QUANTILES, qs)})
    out["max"] = _float(values.max())
    return out


def _counts(ds, column: str) -> dict:
    """Value counts of a column, most frequent first; nulls counted as "null"."""
    counts = Counter(arrow_columns(ds, [column])[column].to_pylist())
    return {("null" if v is None else str(v)): n for v, n in counts.most_common()}


def _lengths(ds, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(instruction, response) lengths; the instruction includes a non-empty `input` after "\n".
    A missing column, a null value and a null-typed (all-None) column count as ""."""
    table = arrow_columns(ds, [c for c in ("instruction", "input", "output") if c in ds.column_names])
    instr, inp, out = (text_array(table, c) for c in ("instruction", "input", "output"))
    if tokenizer is None:
        def measure(texts):
            return pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
        in_len = measure(inp)
        return measure(instr) + in_len + (in_len > 0), measure(out)

    def count(texts: list[str]) -> np.ndarray:
        lengths = []
        for start in range(0, len(texts), TOKENIZE_CHUNK):
            ids = tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
            lengths.extend(len(x) for x in ids)
        return np.asarray(lengths, dtype=np.int64)

    ins = [join_input(a, b, NEWLINE_SEPARATOR) for a, b in zip(instr.to_pylist(), inp.to_pylist())]
    return count(ins), count(out.to_pylist())


def _histogram(per_split: Mapping[str, np.ndarray], bins: int, floor_hi: float = 0.0) -> dict:
    """Shared edges from 0 to max(floor_hi, 99th percentile of all values); larger values go to the
    last bin and are counted in `clipped`."""
    finite = [v[np.isfinite(v)] for v in per_split.values()]
    pooled = np.concatenate(finite) if finite else np.zeros(0)
    hi = max(floor_hi, float(np.quantile(pooled, 0.99)) if pooled.size else 0.0, 1e-9)
    edges = np.linspace(0.0, hi, bins + 1)
    counts, clipped = {}, {}
    for name, v in zip(per_split, finite):
        counts[name] = np.histogram(np.clip(v, 0.0, hi), edges)[0].astype(int).tolist()
        clipped[name] = int((v > hi).sum())
    return {"edges": [float(e) for e in edges], "counts": counts, "clipped": clipped}


def as_splits(data) -> dict:
    """A DatasetDict (or a dict of Datasets) as a dict; a single Dataset as the split "data"."""
    from datasets import Dataset

    if isinstance(data, Dataset):
        return {SINGLE_SPLIT: data}
    if isinstance(data, Mapping) and data and all(isinstance(v, Dataset) for v in data.values()):
        return dict(data.items())
    raise TypeError(f"summarize takes a Dataset or a non-empty DatasetDict, got {type(data).__name__}")


def summarize(variants_or_dataset, tokenizer=None, *, ratio: str = "ppl", require_below_one: bool = True,
              bins: int = 40, oracle: Optional[str] = None) -> dict:
    """Statistics of a variants `DatasetDict` (or any DatasetDict / single Dataset).

    Per split: `rows`, counts of `reflection_status`, `score_status` and `source` (when the
    columns exist), instruction and response `lengths` (tokens with `tokenizer`, else characters;
    the instruction counts a non-empty `input` too) and, for the IFD and r-IFD columns of `ratio`,
    `count` (valid), `missing`, `above_one`, mean, std, min, quantiles q05/q25/median/q75/q95, max.
    `format_rates` gives, per reflected split (those with a `format_outcome` column), how the
    oracle's answers met the format (`format_rates`; labelled with `oracle` when given).
    `histograms` holds shared bin edges and per-split counts for the plots. With the four variant
    splits scored, `selection` gives the V1 and V2 counts, V2 counts by source and by rejection
    reason, and the funnel; a single Dataset with a `source` column gets its counts by source.

    Args:
        variants_or_dataset: a `DatasetDict` (a single `Dataset` is the split `"data"`).
        tokenizer: a transformers tokenizer for token lengths.
        ratio: `"ppl"` (`ifd`/`rifd`) or `"loss"` (`ifd_loss`/`rifd_loss`).
        require_below_one: passed to the V2 selection.
        bins: histogram bins.
        oracle: the oracle's name for the format rates (e.g. the model and its backend).

    Returns:
        A JSON-serialisable dict (`json.dumps(summary, allow_nan=False)` works).
    """
    splits = as_splits(variants_or_dataset)
    ifd_col, rifd_col = ratio_columns(ratio)
    summary = {"ratio": ratio, "score_columns": {"ifd": ifd_col, "rifd": rifd_col},
               "length_unit": "characters" if tokenizer is None else "tokens", "splits": {}, "histograms": {}}
    scores = {"ifd": {}, "rifd": {}}
    lengths = {"instruction_length": {}, "response_length": {}}
    for name, ds in splits.items():
        entry = {"rows": len(ds)}
        for column in (STATUS_COLUMN, SCORE_STATUS_COLUMN, "source"):
            if column in ds.column_names:
                entry[column] = _counts(ds, column)
        ins_len, res_len = _lengths(ds, tokenizer)
        lengths["instruction_length"][name], lengths["response_length"][name] = ins_len, res_len
        entry["lengths"] = {"instruction": value_stats(ins_len.astype(float)), "response": value_stats(res_len.astype(float))}
        for key, column in (("ifd", ifd_col), ("rifd", rifd_col)):
            if column not in ds.column_names:
                continue
            values = score_array(ds, column, "summarize")
            ok = valid_scores(values)
            values = np.where(ok, values, np.nan)
            entry[key] = {**value_stats(values), "missing": int((~ok).sum()), "above_one": int((values > 1).sum())}
            scores[key][name] = values
        summary["splits"][name] = entry
    for key, per_split in {**scores, **lengths}.items():
        if per_split:
            floor_hi = 1.5 if key in scores else 1.0
            summary["histograms"][key] = _histogram({k: v.astype(float) for k, v in per_split.items()}, bins, floor_hi)
    summary["selection"] = _selection(splits, ratio, require_below_one)
    summary["format_rates"] = format_rates(splits, oracle=oracle)
    return summary


def selection_options(context: Optional[Mapping]) -> dict:
    """The `summarize` options of a run's configuration (`ratio`, `require_below_one`), so the
    summary's V2 counts follow the rule the run selected with, not the defaults."""
    return {k: (context or {})[k] for k in ("ratio", "require_below_one") if (context or {}).get(k) is not None}


def coverage(stats, rows) -> str:
    """`" (count of rows rows)"` when the statistics `stats` (`value_stats`) cover fewer than `rows`
    rows (NaN, unscored or omitted ones are left out), else `""`: a table's mean says what it covers."""
    count = stats.get("count") if isinstance(stats, Mapping) and "omitted" not in stats else None
    return "" if count is None or rows is None or count >= rows else f" ({count} of {rows} rows)"


def format_rates(data, oracle: Optional[str] = None) -> dict:
    """How the oracle's answers met the format, per reflected split: `{split: {"oracle", "rows"
    (rows with an outcome), "parsed" (share parsed in full, first try or after a re-ask), and the
    count and share of each outcome in `FORMAT_OUTCOMES`}}`; splits without a `format_outcome`
    column (or only `""`, as `origin`) are left out, and so is `selected` (copies of the rows it
    picked: its share would measure the selection, not the oracle).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.publishing.report import format_rates
        >>> ds = Dataset.from_dict({"format_outcome": ["first_try", "first_try", "after_reask", "fallback"]})
        >>> rates = format_rates({"reflect_response": ds}, oracle="m (llamacpp)")["reflect_response"]
        >>> rates["rows"], rates["parsed"], rates["first_try"], rates["share"]["fallback"]
        (4, 0.75, 2, 0.25)
    """
    splits = as_splits(data) if not isinstance(data, Mapping) else dict(data)
    out = {}
    for name, ds in splits.items():
        if FORMAT_COLUMN not in ds.column_names or name == SELECTED_SPLIT:
            continue
        counts = {k: n for k, n in _counts(ds, FORMAT_COLUMN).items() if k not in ("", "null")}
        rows = sum(counts.values())
        if not rows:
            continue
        entry = {"oracle": oracle, "rows": rows, **{k: counts.get(k, 0) for k in FORMAT_OUTCOMES}}
        entry["share"] = {k: counts.get(k, 0) / rows for k in FORMAT_OUTCOMES}
        entry["parsed"] = (counts.get("first_try", 0) + counts.get("after_reask", 0)) / rows
        out[name] = entry
    return out


def format_rate_lines(rates: Mapping) -> list[str]:
    """One line per split of `format_rates`: parsed share, then each outcome's count."""
    lines = []
    for split, r in rates.items():
        counts = ", ".join(f"{k} {r[k]}" for k in FORMAT_OUTCOMES if r.get(k))
        who = f" [{r['oracle']}]" if r.get("oracle") else ""
        lines.append(f"{split:<22}{r['rows']:>7}  parsed {100 * r['parsed']:.1f}% ({counts}){who}")
    return lines


def _selection(splits: dict, ratio: str, require_below_one: bool) -> dict:
    selection = {}
    ifd_col, rifd_col = ratio_columns(ratio)
    has_variants = all(s in splits for s in VARIANT_SPLITS)
    scored = has_variants and all({ifd_col, rifd_col, "instruction", "output"} <= set(splits[s].column_names)
                                  for s in VARIANT_SPLITS)
    if has_variants:
        both = splits["reflect_both"]
        v1 = {"rows": len(both)}
        if STATUS_COLUMN in both.column_names:
            v1["reflection_ok"] = _counts(both, STATUS_COLUMN).get("ok", 0)
        selection["v1"] = v1
    if scored:
        outcomes = Counter(explain_v2(splits, require_below_one=require_below_one, ratio=ratio)["v2_outcome"])
        total = len(splits["origin"])
        by_source = {s: outcomes.get(s, 0) for s in V2_SOURCES}
        rejected = {r: outcomes.get(r, 0) for r in V2_REJECTIONS if require_below_one or r != "above_one"}
        funnel, left = [["rows", total]], total
        labels = {"missing_score": "scored", "not_improved": "reflected twin: lower r-IFD",
                  "not_reflected": "response reflected", "above_one": "IFD and r-IFD < 1"}
        for reason, n in rejected.items():
            left -= n
            funnel.append([labels[reason], left])
        funnel[-1][0] = "selected"
        selection["v2"] = {"require_below_one": require_below_one, "ratio": ratio, "rows": total,
                           "selected": sum(by_source.values()), "by_source": by_source, "rejected": rejected,
                           "funnel": funnel}
    for name, ds in splits.items():
        if "source" in ds.column_names and not has_variants:
            selection.setdefault("by_source", {})[name] = _counts(ds, "source")
    return selection


# --------------------------------------------------------------------------- plots


def _figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # the y axes count rows
    return fig, axes


def _plot_score_hist(summary: dict, key: str, path: Path) -> None:
    hist = summary["histograms"][key]
    edges, names = np.asarray(hist["edges"]), list(hist["counts"])
    ncols = min(2, len(names))
    nrows = -(-len(names) // ncols)
    label = {"ifd": "IFD", "rifd": "r-IFD"}[key]
    fig, axes = _figure(nrows, ncols, 5.5 * ncols, 3.4 * nrows)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        entry = summary["splits"].get(name, {})
        stats = {"count": 0, "missing": 0, "mean": None, **entry.get(key, {})}
        ax.stairs(hist["counts"][name], edges, fill=True, alpha=0.75)
        ax.set_ylim(0, max([1, *hist["counts"][name]]) * 1.08)
        if not stats["count"]:
            note = "no rows" if entry.get("rows") == 0 else "no valid scores"
            ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", color="gray")
        ax.axvline(1.0, color="crimson", linestyle="--", linewidth=1.2, label="1.0")
        mean = "n/a" if stats["mean"] is None else f"{stats['mean']:.3f}"
        ax.set_title(f"{name}: {stats['count']} scored, {stats['missing']} missing, mean {mean}", fontsize=10)
        ax.set_xlabel(f"{label} ({summary['score_columns'][key]})" + (
            f"; {hist['clipped'][name]} above {edges[-1]:.2f} in last bin" if hist["clipped"][name] else ""))
        ax.set_ylabel("rows")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{label} per split ({summary['ratio']} ratio)")
    fig.savefig(path, dpi=110)


def _plot_lengths(summary: dict, path: Path) -> None:
    fig, axes = _figure(1, 2, 11, 3.8)
    for ax, key, title in zip(axes.flat, ("instruction_length", "response_length"), ("Instruction", "Response")):
        hist = summary["histograms"][key]
        for i, (name, counts) in enumerate(hist["counts"].items()):  # identical splits stay visible
            label = f"{name} (no rows)" if summary["splits"].get(name, {}).get("rows") == 0 else name
            ax.stairs(counts, hist["edges"], label=label, linewidth=1.6, linestyle=LINESTYLES[i % len(LINESTYLES)])
        ax.set_ylim(0, max(1, *(max(c, default=0) for c in hist["counts"].values())) * 1.08)
        ax.set_title(f"{title} length")
        ax.set_xlabel(summary["length_unit"] + " (last bin holds longer rows)")
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_funnel(summary: dict, path: Path) -> None:
    v2 = summary["selection"]["v2"]
    labels = [label for label, _ in v2["funnel"]]
    counts = [n for _, n in v2["funnel"]]
    fig, axes = _figure(1, 1, 8, 0.7 * len(labels) + 1.6)
    ax = axes[0, 0]
    y = np.arange(len(labels))
    ax.barh(y, counts, color="steelblue")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    top = max(counts[0], 1)
    for yi, n in zip(y, counts):
        ax.text(n + 0.01 * top, yi, f"{n} ({100 * n / top:.0f}%)", va="center", fontsize=9)
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("rows")
    src = ", ".join(f"{k}: {n}" for k, n in v2["by_source"].items())
    rule = "IFD, r-IFD < 1 required" if v2["require_below_one"] else "paper form"
    ax.set_title(f"Selective Reflection-Tuning (V2) funnel, {rule}\nselected by source: {src}", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_summary(summary_or_data: Union[dict, object], out_dir, tokenizer=None, **summarize_kwargs) -> list[Path]:
    """Write PNG plots of a summary (or of data, summarised first) to `out_dir`.

    Files: `ifd_hist.png` and `rifd_hist.png` (one panel per split, a dashed line at 1),
    `lengths.png` (instruction and response length distributions per split) and
    `selection_funnel.png` (V2: rows, scored, improved, reflected, below one, selected), each only
    when the summary has the data for it. A split with no rows (or no valid score) is drawn as an
    empty panel with a note.

    Returns:
        The paths written, in that order.

    Example:
        >>> import tempfile
        >>> from reflectune_hf import load_sample
        >>> from reflectune_hf.publishing.report import plot_summary
        >>> [p.name for p in plot_summary(load_sample(), tempfile.mkdtemp())]
        ['lengths.png']
    """
    is_summary = isinstance(summary_or_data, Mapping) and "histograms" in summary_or_data
    summary = summary_or_data if is_summary else summarize(summary_or_data, tokenizer=tokenizer, **summarize_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in ("ifd", "rifd"):
        if key in summary["histograms"]:
            written.append(out / PLOT_FILES[key])
            _plot_score_hist(summary, key, written[-1])
    if "instruction_length" in summary["histograms"]:
        written.append(out / PLOT_FILES["lengths"])
        _plot_lengths(summary, written[-1])
    if "v2" in summary.get("selection", {}):
        written.append(out / PLOT_FILES["funnel"])
        _plot_funnel(summary, written[-1])
    logger.info("plot_summary wrote %s", [str(p) for p in written])
    return written
