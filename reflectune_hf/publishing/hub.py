"""Publishing: `push_to_hub` and `save_local`, each with a generated dataset card and plots.

The card is rendered from `cards/dataset_card.md` with huggingface_hub's `DatasetCard` /
`DatasetCardData`: what was done (method, papers), the configuration (oracle model and the
*host* of its base URL only, student model, template, thresholds, prompt set), counts per split
and per status, score statistics, the PNGs of `report.plot_summary`, tags, and the source
dataset and its license when known. Secrets never reach it: keys named as secrets
(`api_key`, `*_key`, `*token` but not `*_tokens*`, `secret`, `password`, `bearer`...) are dropped,
URLs lose their user and password (and secret-named query parameters) but keep their path, and
local paths show as a file name (`my.jsonl (local file)`) or `local data`, never as a path.

Example:
    >>> import tempfile
    >>> from datasets import load_from_disk
    >>> from reflectune_hf import load_sample
    >>> from reflectune_hf.publishing.hub import save_local
    >>> out = save_local(load_sample(), tempfile.mkdtemp(), card_context={"source_dataset": "sample"})
    >>> len(load_from_disk(str(out / "arrow")))
    40
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Mapping, Optional, Union

from .. import __version__
from ..oracles.stage_formats import FORMAT_OUTCOMES
from ..sanitize import (  # noqa: F401  (public here too, as before)
    host_only, is_hub_id, is_secret_key, public_name, sanitize_config, sanitize_context, strip_url_secrets)
from ..selection.select import VARIANT_SPLITS
from ..utils import card_template, versioned
from . import outputs
from .report import coverage, plot_summary, selection_options, summarize

logger = logging.getLogger(__name__)

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


def _splits(data) -> dict:
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
        rows.append({"name": f"V2 (selective, ratio={v2.get('ratio')}, require_below_one={v2.get('require_below_one')})",
                     "rows": v2.get("selected")})
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
                     "instruction": f"{stat(lengths.get('instruction'))} / {stat(lengths.get('instruction'), 'median')}",
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

    splits = _splits(data)
    context = sanitize_context(card_context)
    summary = summary if summary is not None else summarize(splits)  # a Dataset is `train` here too
    is_variants = set(VARIANT_SPLITS) <= set(splits)
    rows = max(len(ds) for ds in splits.values())
    license_id, license_text = _license(context.get("license"))
    card_data = DatasetCardData(
        license=license_id,
        language=context.get("language", ["en"]),
        pretty_name=context.get("pretty_name", "Reflection-Tuning recycled data"),
        size_categories=[_size_category(rows)],
        source_datasets=[context["source_dataset"]] if is_hub_id(context.get("source_dataset")) else None,
        task_categories=["text-generation"],
        tags=sorted({"reflection-tuning", "instruction-tuning", "data-recycling", "reflectune_hf",
                     *context.get("tags", [])}),
        configs=[{"config_name": "default",
                  "data_files": [{"split": name, "path": f"data/{name}-*"} for name in _published(splits)]}],
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
        has_scores=any("ifd" in ds.column_names for ds in splits.values()),
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


def with_messages(data):
    """Add the `messages` column of `train.to_messages` to every split (kept when present), so
    the published data trains as it is with `trl sft` (`assistant_only_loss` and the Vicuna
    template). A row that cannot train (empty instruction or output) is kept with `messages`
    null and a warning counts them (filter them out before training); a non-string text column
    raises `ColumnError` before anything is written.
    """
    from datasets import DatasetDict, List, Value

    splits = _splits(data)
    done = {}
    for name, ds in splits.items():
        if "messages" not in ds.column_names:
            features = ds.features.copy()
            features["messages"] = List({"role": Value("string"), "content": Value("string")})
            ds = ds.map(_messages_or_null, batched=True, features=features, desc=f"messages ({name})")
            untrainable = ds["messages"].count(None) if len(ds) else 0
            if untrainable:
                logger.warning("%s: %d of %d rows have an empty instruction or output: their `messages` is null; "
                               "drop them (e.g. ds.filter(lambda r: r['messages'] is not None)) before training",
                               name, untrainable, len(ds))
        done[name] = ds
    return DatasetDict(_same_columns(done)) if isinstance(data, DatasetDict) else done["train"]


@versioned
def _messages_or_null(batch: dict) -> dict:
    """`to_messages` row by row, `None` for a row with an empty instruction or output."""
    from ..data import ColumnError, batch_size_of, require_columns
    from ..training.sft import STAGE, to_messages

    require_columns(batch, ["instruction", "output"], STAGE)
    messages = []
    for k in range(batch_size_of(batch)):
        try:
            messages.append(to_messages({c: v[k] for c, v in batch.items()})["messages"])
        except ColumnError:
            raise
        except ValueError:
            messages.append(None)
    return {"messages": messages}


def _same_columns(splits: dict) -> dict:
    """One schema for all splits (the Hub loads the splits of a config with one schema): a column
    missing from a split is added as nulls, in the column order of the first split that has it."""
    from datasets import Features

    from ..data import empty_dataset

    features: dict = {}
    for ds in splits.values():
        for name in ds.column_names:
            features.setdefault(name, ds.features[name])
    out = {}
    for name, ds in splits.items():
        if len(ds) == 0:  # built from the schema: add_column fails on an empty selection of a bigger table
            out[name] = empty_dataset(features)
            continue
        for column in features:
            if column not in ds.column_names:
                ds = ds.add_column(column, [None] * len(ds), feature=features[column])
        out[name] = ds.select_columns(list(features)).cast(Features(features))
    return out


def _published(splits: dict) -> dict:
    """The splits written as data files: `load_dataset` cannot read a split without rows, so an
    empty one (a selection that kept nothing) is left out of the files and the card's configs;
    the card's tables still show it with 0 rows."""
    published = {name: ds for name, ds in splits.items() if len(ds)}
    if not published:
        raise ValueError(f"Nothing to publish: every split of {list(splits)} is empty")
    return published


def _prepare(data, tokenizer, context: Optional[Mapping] = None):
    """`with_messages(data)`, its splits, those with rows (warning about the others), its summary (V2 by `context`)."""
    data = with_messages(data)
    splits = _splits(data)
    published = _published(splits)
    if len(published) < len(splits):
        logger.warning("Split(s) %s have no rows: no data files are written for them",
                       [name for name in splits if name not in published])
    return data, splits, published, summarize(splits, tokenizer=tokenizer, **selection_options(context))


def _write_plots(data, summary: dict, out_dir: Path) -> list[str]:
    """PNGs of `plot_summary` in `out_dir/plots`, as paths relative to `out_dir`."""
    paths = plot_summary(summary, out_dir / "plots")
    return [str(Path(p).relative_to(out_dir)) for p in paths]


def save_local(data, out_dir: Union[str, Path], card_context: Optional[Mapping] = None, tokenizer=None,
               quality: Optional[Mapping] = None, run_record: Optional[Mapping] = None) -> Path:
    """Write what `push_to_hub` would publish to a folder, for users without a Hub account.

    Every split gets a `messages` column (`with_messages`), so the folder trains with `trl sft`.

    Layout: `arrow/` (`save_to_disk`, reload with `load_from_disk`), `data/<split>-00000-of-00001.parquet`
    (the Hub's layout; `load_dataset(str(out_dir))` reads the splits the README declares, or
    `load_dataset("parquet", data_files={split: f"{out_dir}/data/{split}-*.parquet", ...})`),
    `README.md` (the card), `plots/*.png`, `summary.json` (and `quality.json` with `quality`, the
    `quality.quality_report` of the data, also shown in the card; `reflectune_config.json` with
    `run_record`, the configuration of the run). Returns `out_dir`.

    The folder may hold an earlier write: the files it lists in its manifest (`outputs.MANIFEST`)
    and this write does not write again (a `quality.json`, a split, plots) are removed, and the
    manifest then lists this write's files; a file the folder held that no write of ours listed
    (the user's own) is never touched. See `outputs` for why.
    """
    from datasets import DatasetDict

    data, splits, published, summary = _prepare(data, tokenizer, card_context)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = outputs.read_manifest(out)  # before anything is written: a malformed one stops here
    outputs.refuse_foreign(out, previous, published, quality=quality is not None, record=run_record is not None)
    # An empty split needs one explicit shard: datasets writes none by default, and then cannot load it.
    empty = {name: 1 for name, ds in splits.items() if len(ds) == 0}
    if isinstance(data, DatasetDict):
        data.save_to_disk(str(out / "arrow"), num_shards=empty or None)
    else:
        data.save_to_disk(str(out / "arrow"), num_shards=1 if empty else None)
    written = outputs.arrow_files(out / "arrow", list(data) if isinstance(data, DatasetDict) else None)
    (out / "data").mkdir(exist_ok=True)
    for name, ds in published.items():
        written.append(outputs.parquet_file(name))
        ds.to_parquet(str(out / written[-1]))
    plots = _write_plots(data, summary, out)
    texts = {"summary.json": json.dumps(summary, indent=2, allow_nan=False)}
    if quality is not None:
        texts["quality.json"] = json.dumps(quality, indent=2, allow_nan=False)
    if run_record is not None:
        texts[outputs.RUN_RECORD] = json.dumps(dict(run_record), indent=2, default=str)
    for name, text in texts.items():
        (out / name).write_text(text, encoding="utf-8")
    build_card(data, card_context, summary, plots, quality=quality).save(str(out / "README.md"))
    written += [*plots, *texts, "README.md"]
    outputs.remove_stale(out, previous, written)
    outputs.write_manifest(out, written)
    logger.info("Saved %s to %s", {k: len(v) for k, v in splits.items()}, out)
    return out


def require_token(token: Optional[str] = None) -> str:
    """`token`, else the one huggingface_hub finds (`HF_TOKEN`, or the file `hf auth login` writes);
    without one, a `PermissionError` that says how to log in, before anything is sent.

    Example:
        >>> from reflectune_hf.publishing.hub import require_token
        >>> require_token("hf_given")
        'hf_given'
    """
    from huggingface_hub import get_token

    found = token or get_token()
    if not found:
        raise PermissionError("No Hugging Face token found, so nothing can be pushed: log in with `hf auth login` "
                              "or set HF_TOKEN (a token with write access, https://huggingface.co/settings/tokens)")
    return found


def push_to_hub(data, repo_id: str, private: bool = True, token: Optional[str] = None,
                card_context: Optional[Mapping] = None, tokenizer=None, commit_message: Optional[str] = None,
                quality: Optional[Mapping] = None) -> str:
    """Push a Dataset or the variants DatasetDict (splits kept) to the Hub with its card and plots.

    Every split gets a `messages` column (`with_messages`), so the dataset trains with `trl sft`.

    Three commits: the data (datasets' own `push_to_hub`, parquet shards under `data/`), the
    plots under `plots/`, then the README card, which links the plots and declares the splits.
    The repository is private unless `private=False`. Without a token (`token`, `HF_TOKEN` or
    `hf auth login`) it stops before sending anything and says how to log in. Returns the
    repository URL.

    Example:
        >>> from reflectune_hf.publishing.hub import push_to_hub
        >>> push_to_hub(variants, "me/alpaca-recycled", card_context={"oracle_model": "gpt-4o-mini"})  # doctest: +SKIP
    """
    from datasets import DatasetDict
    from huggingface_hub import HfApi

    token = require_token(token)
    data, _, published, summary = _prepare(data, tokenizer, card_context)  # the type checks, before sending
    message = commit_message or "Upload data recycled with reflectune_hf"
    (DatasetDict(published) if isinstance(data, DatasetDict) else published["train"]).push_to_hub(
        repo_id, private=private, token=token, commit_message=message)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        plots = _write_plots(data, summary, Path(tmp))
        api.upload_folder(folder_path=str(Path(tmp) / "plots"), path_in_repo="plots", repo_id=repo_id,
                          repo_type="dataset", commit_message="Add reflectune_hf plots")
    card = build_card(data, card_context, summary, plots, repo_id=repo_id, quality=quality)
    card.push_to_hub(repo_id, token=token, repo_type="dataset", commit_message="Add the dataset card")
    return f"https://huggingface.co/datasets/{repo_id}"
