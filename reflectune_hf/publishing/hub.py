"""Publishing: `push_to_hub` and `save_local`, each with a generated dataset card
(`card.build_card`) and plots (`report.plot_summary`).

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
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Union

from ..sanitize import (  # noqa: F401  (public here too, as before)
    host_only, is_hub_id, is_secret_key, public_name, sanitize_config, sanitize_context, strip_url_secrets)
from ..utils import versioned
from . import outputs
from .card import build_card, published_splits, splits_of  # noqa: F401  (build_card: public here too)
from .report import plot_summary, selection_options, summarize

logger = logging.getLogger(__name__)


def with_messages(data):
    """Add the `messages` column of `train.to_messages` to every split (kept when present), so
    the published data trains as it is with `trl sft` (`assistant_only_loss` and the Vicuna
    template). A row that cannot train (empty instruction or output) is kept with `messages`
    null and a warning counts them (filter them out before training); a non-string text column
    raises `ColumnError` before anything is written.
    """
    from datasets import DatasetDict, List, Value

    splits = splits_of(data)
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
    missing from a split is added as nulls, in the column order of the first split that has it. A
    column without any value in a split (typed `null` there) takes its type from another split."""
    from datasets import Features, Value

    from ..data import empty_dataset

    features: dict = {}
    for ds in splits.values():
        for name in ds.column_names:
            if features.get(name, Value("null")) == Value("null"):
                features[name] = ds.features[name]
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


def _prepare(data, tokenizer, context: Optional[Mapping] = None):
    """`with_messages(data)`, its splits, those with rows (warning about the others), its summary (V2 by `context`)."""
    sanitize_config(context)  # a context that is no mapping: one TypeError, before anything is written or sent
    data = with_messages(data)
    splits = splits_of(data)
    published = published_splits(splits)
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
    The repository is private unless `private=False`; `private` only applies to a repository it
    creates, so an existing public one is refused unless `private=False`. Without a token (`token`,
    `HF_TOKEN` or `hf auth login`) it stops before sending anything and says how to log in. Returns
    the repository URL.

    Example:
        >>> from reflectune_hf.publishing.hub import push_to_hub
        >>> push_to_hub(variants, "me/alpaca-recycled", card_context={"oracle_model": "gpt-4o-mini"})  # doctest: +SKIP
    """
    from datasets import DatasetDict
    from huggingface_hub import HfApi

    token = require_token(token)
    data, _, published, summary = _prepare(data, tokenizer, card_context)  # the type checks, before sending
    api = HfApi(token=token)
    # datasets' `private` is ignored for a repository that exists: it would publish the data, silently.
    if private and api.repo_exists(repo_id, repo_type="dataset") and not api.repo_info(
            repo_id, repo_type="dataset").private:
        raise PermissionError(f"The dataset repo {repo_id} exists and is public: the data would be public, as "
                              "`private` only applies to a new repo. Make it private on the Hub, push to another "
                              "repo, or pass private=False (--no_private) to publish it publicly; nothing was sent")
    message = commit_message or "Upload data recycled with reflectune_hf"
    (DatasetDict(published) if isinstance(data, DatasetDict) else published["train"]).push_to_hub(
        repo_id, private=private, token=token, commit_message=message)
    with tempfile.TemporaryDirectory() as tmp:
        plots = _write_plots(data, summary, Path(tmp))
        api.upload_folder(folder_path=str(Path(tmp) / "plots"), path_in_repo="plots", repo_id=repo_id,
                          repo_type="dataset", commit_message="Add reflectune_hf plots")
    card = build_card(data, card_context, summary, plots, repo_id=repo_id, quality=quality)
    card.push_to_hub(repo_id, token=token, repo_type="dataset", commit_message="Add the dataset card")
    return f"https://huggingface.co/datasets/{repo_id}"
