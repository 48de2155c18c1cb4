"""The dataset card: `build_card` renders `cards/dataset_card.md` with huggingface_hub's
`DatasetCard` / `DatasetCardData` for `hub.save_local` and `hub.push_to_hub`.

What the card holds: what was done (method, papers), the configuration (oracle model and the
*host* of its base URL only, student model, template, thresholds, prompt set), counts per split
and per status, score statistics, the PNGs of `report.plot_summary`, tags, and the source
dataset and its license when known. Secrets never reach it (`sanitize.sanitize_context`): keys
named as secrets are dropped, URLs lose their user and password (and secret-named query
parameters), local paths show as a file name or `local data`, never as a path.

Example:
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.publishing.card import build_card
    >>> card = build_card(load_sample(), card_context={"source_dataset": "sample", "license": "cc-by-nc-4.0"})
    >>> card.data.license, "| `train` | 40 |" in card.text
    ('cc-by-nc-4.0', True)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional

from .. import __version__
from ..oracles.stage_formats import FORMAT_OUTCOMES
from ..sanitize import is_hub_id, sanitize_context
from ..selection.select import VARIANT_SPLITS
from ..utils import card_template
from .report import coverage, summarize

SPLIT_DESCRIPTIONS = {
    "origin": "the source pairs (inputs folded into the instruction when compressed)",
    "reflect_instruction": "instruction reflection: a new instruction and its answer",
    "reflect_response": "response reflection of the original pair",
    "reflect_both": "response reflection of the instruction-reflected pair (V1, *Recycled*)",
    "selected": "the pairs the selection kept (V2: `source` names the variant each comes from)",
}
PLOT_TITLES = {
    "ifd_hist.png": "IFD per split",
    "rifd_hist.png": "r-IFD per split",
    "lengths.png": "Instruction and response lengths",
    "selection_funnel.png": "Selective Reflection-Tuning funnel",
}


def splits_of(data) -> dict:
    """{split name: Dataset} for a Dataset (one split, "train") or a DatasetDict."""
    from datasets import Dataset, DatasetDict

    if isinstance(data, DatasetDict):
        if not len(data):
            raise ValueError("The DatasetDict has no splits")
        return dict(data)
    if isinstance(data, Dataset):
        return {"train": data}
    raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(data).__name__}")


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    """`text` for one markdown table cell: a pipe escaped, line breaks as `<br>` (they would end the table)."""
    return str(text).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>").replace("\r", "<br>")


def _status_rows(splits: dict) -> list[dict]:
    rows = []
    for name, ds in splits.items():
        for column in ds.column_names:
            if column.endswith("_status") and ds.features[column].dtype in ("string", "large_string"):
                counts = Counter(v or "" for v in ds[column])  # null and "" are one "(none)"
                text = ", ".join(f"{k or '(none)'}: {n}" for k, n in counts.most_common())
                rows.append({"split": name, "column": column, "counts": text or "no rows"})
    return rows


def _score_rows(summary: dict) -> list[dict]:
    rows = []
    for split, stats in summary.get("splits", {}).items():
        for name in ("ifd", "rifd"):
            s = stats.get(name)
            if isinstance(s, Mapping) and s.get("count"):
                rows.append({"split": split, "name": name.upper().replace("RIFD", "r-IFD"),
                             **{k: _format(s.get(k)) for k in ("count", "mean", "median", "q05", "q95")}})
    return rows


def _selection_rows(summary: dict) -> list[dict]:
    selection = summary.get("selection") or {}
    rows = []
    if "v1" in selection:
        rows.append({"name": "V1 (recycled, `reflect_both`): rows", "rows": selection["v1"].get("rows")})
        rows.append({"name": "V1: rows really reflected (status ok)", "rows": selection["v1"].get("reflection_ok")})
    v2 = selection.get("v2")
    if v2:
        options = f"ratio={v2.get('ratio')}, require_below_one={v2.get('require_below_one')}"
        rows.append({"name": f"V2 (selective, {options})", "rows": v2.get("selected")})
        for source, n in (v2.get("by_source") or {}).items():
            rows.append({"name": f"V2 from `{source}`", "rows": n})
    return rows


def _quality_rows(quality: Optional[Mapping]) -> list[dict]:
    """Rows of the card's data-quality table from `quality.quality_report` (means, medians)."""
    def stat(entry, key="mean"):
        return _format(entry.get(key)) if isinstance(entry, Mapping) and "omitted" not in entry else "–"
    rows = []
    for split, entry in ((quality or {}).get("splits") or {}).items():
        lengths = entry.get("lengths") or {}
        ppl = ((entry.get("perplexity") or {}).get("columns") or {}).get("ppl_out_condition")
        rows.append({"split": split, "rows": entry.get("rows"),
                     "instruction": f"{stat(lengths.get('instruction'))} / "
                                    f"{stat(lengths.get('instruction'), 'median')}",
                     "response": f"{stat(lengths.get('response'))} / {stat(lengths.get('response'), 'median')}",
                     "perplexity": f"{stat(ppl)} / {stat(ppl, 'median')}{coverage(ppl, entry.get('rows'))}",
                     "coherence": stat(entry.get("coherence")) + coverage(entry.get("coherence"), entry.get("rows")),
                     "ifd": stat(entry.get("ifd"), "median") + coverage(entry.get("ifd"), entry.get("rows"))})
    return rows


def _format_rows(summary: dict, oracle: Optional[str]) -> list[dict]:
    """Rows of the card's answer-format table from `summary["format_rates"]` (report.format_rates)."""
    def pct(x) -> str:
        return f"{100 * x:.1f}%"

    rows = []
    for split, r in (summary.get("format_rates") or {}).items():
        rows.append({"split": split, "oracle": r.get("oracle") or oracle or "–", "rows": r["rows"],
                     "parsed": pct(r["parsed"]),
                     **{k: f"{r[k]} ({pct(r['share'][k])})" for k in FORMAT_OUTCOMES}})
    return rows


def _license(value) -> tuple:
    """(`license` metadata, text named in the body): a Hub id as is; free text as `other`, on one line."""
    text = " ".join(str(value).split()) if value else None
    return (text if not text or re.fullmatch(r"[a-z0-9][a-z0-9.+_-]{0,63}", text) else "other"), text


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


def build_card(data, card_context: Optional[Mapping] = None, summary: Optional[dict] = None,
               plot_files=(), repo_id: Optional[str] = None, quality: Optional[Mapping] = None):
    """Render the dataset card (`huggingface_hub.DatasetCard`) of a Dataset or variants DatasetDict.

    Args:
        data: the `Dataset` or `DatasetDict` published.
        card_context: configuration to show (oracle_model, oracle_base_url, student_model,
            template, prompt_set, thresholds, source_dataset, license, pretty_name, tags...);
            secrets are removed by `sanitize_context`.
        summary: `report.summarize(data)`, computed when not given.
        plot_files: PNG names, relative to the card (e.g. `plots/ifd_hist.png`).
        repo_id: the Hub id shown in the usage snippet.
        quality: `quality.quality_report(data)`, shown as a data-quality table when given.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    splits = splits_of(data)
    context = sanitize_context(card_context)
    summary = summary if summary is not None else summarize(splits)  # a Dataset is `train` here too
    is_variants = set(VARIANT_SPLITS) <= set(splits)
    # Only data an oracle went over is said to be recycled (`reflectune score` on plain pairs is not).
    is_reflected = is_variants or any("reflection_status" in ds.column_names for ds in splits.values())
    has_scores = any("ifd" in ds.column_names for ds in splits.values())
    title = ("Reflection-Tuning recycled data" if is_reflected else "IFD-scored instruction data" if has_scores
             else "Instruction data")
    rows = max(len(ds) for ds in splits.values())
    license_id, license_text = _license(context.get("license"))
    card_data = DatasetCardData(
        license=license_id,
        language=context.get("language", ["en"]),
        pretty_name=context.get("pretty_name", title),
        size_categories=[_size_category(rows)],
        source_datasets=[context["source_dataset"]] if is_hub_id(context.get("source_dataset")) else None,
        task_categories=["text-generation"],
        tags=sorted({"instruction-tuning", "reflectune_hf", *(("reflection-tuning", "data-recycling") if is_reflected
                                                               else ()), *context.get("tags", [])}),
        configs=[{"config_name": "default",
                  "data_files": [{"split": name, "path": f"data/{name}-*"} for name in published_splits(splits)]}],
    )
    skip = {"license", "language", "pretty_name", "tags"}
    config_rows = [{"name": _cell(k), "value": _cell(_format(v) if not isinstance(v, (dict, list)) else json.dumps(v))}
                   for k, v in context.items() if k not in skip]
    config_rows.append({"name": "reflectune_hf version", "value": __version__})
    return DatasetCard.from_template(
        card_data,
        template_path=str(card_template("dataset_card.md")),
        pretty_name=card_data.pretty_name,
        package_version=__version__,
        source_dataset=context.get("source_dataset"),
        license=license_text,
        repo_id=repo_id or "<your-namespace>/<dataset>",
        is_variants=is_variants,
        is_reflected=is_reflected,
        has_scores=has_scores,
        splits=[{"name": n, "rows": len(ds), "description": SPLIT_DESCRIPTIONS.get(n, "")} for n, ds in splits.items()],
        status_rows=_status_rows(splits),
        score_rows=_score_rows(summary),
        selection_rows=_selection_rows(summary),
        format_rows=_format_rows(summary, context.get("oracle_model")),
        quality_rows=_quality_rows(quality),
        quality_tokenizer=(quality or {}).get("tokenizer"),
        quality_embedder=(quality or {}).get("embedding_model"),
        plots=[{"path": p, "title": PLOT_TITLES.get(Path(p).name, Path(p).stem)} for p in plot_files],
        config_rows=config_rows,
    )


def published_splits(splits: dict) -> dict:
    """The splits written as data files: `load_dataset` cannot read a split without rows, so an
    empty one (a selection that kept nothing) is left out of the files and the card's configs;
    the card's tables still show it with 0 rows."""
    published = {name: ds for name, ds in splits.items() if len(ds)}
    if not published:
        raise ValueError(f"Nothing to publish: every split of {list(splits)} is empty")
    return published
