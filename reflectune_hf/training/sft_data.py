"""The data side of SFT: Alpaca rows to a `messages` column (`to_messages`), and the checks that
run before training (`check_sft_dataset`, `prepare_sft_dataset`). `training.sft` builds the
trainer on them.

Example:
    >>> from reflectune_hf.training.sft_data import to_messages
    >>> to_messages({"instruction": "Say hi.", "output": "Hi!"})["messages"][0]
    {'role': 'user', 'content': 'Say hi.'}
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Optional

from ..data import ColumnError, require_columns
from ..prompts import VICUNA_INPUT_SEPARATOR, join_input
from ..utils import versioned

logger = logging.getLogger(__name__)

STAGE = "vicuna_sft"


def _one_row(instruction, input, output, system, where: str, own_system=None) -> list[dict]:
    for name, value in (("instruction", instruction), ("output", output), ("input", input)):
        if value is not None and not isinstance(value, str):
            raise ColumnError(f"{STAGE}: {where} has a non-string {name} ({type(value).__name__})")
        if name != "input" and not (value or "").strip():
            raise ValueError(f"{STAGE}: {where} has an empty {name} ({value!r}); SFT needs non-empty text")
    messages = [{"role": "system", "content": system}] if system is not None else []
    if own_system is not None and not isinstance(own_system, str):
        raise ColumnError(f"{STAGE}: {where} has a non-string system ({type(own_system).__name__})")
    if own_system:
        if system is not None:
            raise ValueError(f"{STAGE}: {where} has a system prompt of its own (`system` column), and system= was "
                             "given: pass system=None to keep the data's, or remove the `system` column first")
        messages = [{"role": "system", "content": own_system}]
    messages.append({"role": "user", "content": join_input(instruction, input, VICUNA_INPUT_SEPARATOR)})
    messages.append({"role": "assistant", "content": output})
    return messages


@versioned
def to_messages(example: Mapping, system: Optional[str] = None) -> dict:
    """Map function: Alpaca row(s) to a `messages` column (one user turn, one assistant turn).

    Input columns: `instruction`, `output` (non-empty strings), `input` (optional, may be empty).
    Output column: `messages`, `[{"role": "user", ...}, {"role": "assistant", "content": output}]`,
    with a leading system message when `system` is given or the row has a non-empty `system` column
    (TRL data loaded with a system turn keeps it there; a row with both raises `ValueError`); the
    Vicuna template supplies the Vicuna system prompt otherwise. Works with `map` and
    `map(batched=True)`; other columns are kept. An empty instruction or output raises
    `ValueError` naming the row.

    Example:
        >>> from reflectune_hf.training.sft import to_messages
        >>> to_messages({"instruction": "Add.", "input": "2+2", "output": "4"})["messages"]
        [{'role': 'user', 'content': 'Add.\\nInput:\\n2+2'}, {'role': 'assistant', 'content': '4'}]
    """
    require_columns(example, ["instruction", "output"], STAGE)
    ids = example.get("id")
    if isinstance(example["instruction"], list):  # a batch
        n = len(example["instruction"])
        inputs = example.get("input") or [""] * n
        systems = example.get("system") or [None] * n
        rows = [
            _one_row(i, x, o, system, f"row id={ids[k]}" if ids is not None else f"row {k} of the batch", s)
            for k, (i, x, o, s) in enumerate(zip(example["instruction"], inputs, example["output"], systems))
        ]
        return {"messages": rows}
    where = f"row id={ids}" if ids is not None else "a row"
    return {"messages": _one_row(example["instruction"], example.get("input"), example["output"], system, where,
                                 example.get("system"))}


def _messages_problem(messages) -> Optional[str]:
    if not isinstance(messages, list) or not messages:
        return "no messages"
    has_system = isinstance(messages[0], Mapping) and messages[0].get("role") == "system"
    if has_system and not isinstance(messages[0].get("content"), str):  # "" is FastChat's empty system prompt
        return "the system message has no text (content must be a string)"
    turns = messages[1:] if has_system else messages
    for k, message in enumerate(turns):
        if not isinstance(message, Mapping):
            return f"message {k} is not a dict"
        expected = "user" if k % 2 == 0 else "assistant"
        if message.get("role") != expected:
            return f"message {k} has role {message.get('role')!r} where {expected!r} was expected (roles must alternate)"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"an empty {'instruction' if expected == 'user' else 'output'} (message {k})"
    if len(turns) < 2:
        return "no assistant turn"
    return None


def check_sft_dataset(ds, stage: str = STAGE, purpose: str = "trained on", allow_empty: bool = False) -> None:
    """Raise before training when a dataset cannot train: `ColumnError` for missing columns,
    `ValueError` for a dataset without rows (unless `allow_empty`) or listing the rows (by `id`
    when present) with an empty instruction or output, or `messages` that are empty, do not
    alternate user/assistant, have no assistant turn, or a system message without text.

    Accepts a `messages` dataset or an Alpaca one (`instruction`, `output`, optional `input`).
    `stage` and `purpose` word the error (`reflect: 1 of 2 rows cannot be recycled: ...`).
    """
    if isinstance(ds, Mapping):  # a DatasetDict
        raise TypeError(f"{stage}: pass one split (e.g. ds['train']), not a {type(ds).__name__}")
    if len(ds) == 0 and not allow_empty:
        raise ValueError(f"{stage}: the data has no rows, nothing can be {purpose}")
    has_messages = "messages" in ds.column_names
    if not has_messages:
        require_columns(ds, ["instruction", "output"], stage)
    columns = ["messages"] if has_messages else [c for c in ("instruction", "input", "output") if c in ds.column_names]
    if "id" in ds.column_names:
        columns.append("id")
    problems, offset = [], 0
    for batch in ds.select_columns(columns).iter(batch_size=4096):
        n = len(batch[columns[0]])
        for k in range(n):
            label = f"id={batch['id'][k]}" if "id" in batch else f"row {offset + k}"
            if has_messages:
                problem = _messages_problem(batch["messages"][k])
            else:
                values = {c: batch[c][k] for c in ("instruction", "output")}
                bad_type = [c for c, v in values.items() if v is not None and not isinstance(v, str)]
                empty = [c for c, v in values.items() if not bad_type and not (v or "").strip()]
                problem = (f"non-string {' and '.join(bad_type)}" if bad_type
                           else f"empty {' and '.join(empty)}" if empty else None)
            if problem:
                problems.append((label, problem))
        offset += n
    if problems:
        shown = "; ".join(f"{label}: {problem}" for label, problem in problems[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ValueError(f"{stage}: {len(problems)} of {len(ds)} rows cannot be {purpose}: {shown}{more}. "
                         "Fix or drop these rows first (e.g. with `ds.filter`).")


def _warn_unreflected(ds) -> None:
    """Say how many rows train on a pair their reflection did not rewrite (`reflection_status` set and
    not `ok`, e.g. `reflect_both` rows whose oracle failed): they are kept, never silently."""
    if "reflection_status" not in ds.column_names:
        return
    counts = Counter(s for s in ds["reflection_status"] if s and s != "ok")
    if counts:
        logger.warning("%s: %d of %d rows were not really reflected (reflection_status %s): they train on the "
                       "pair they kept; filter on reflection_status == 'ok' to leave them out", STAGE,
                       sum(counts.values()), len(ds), dict(counts.most_common()))


@versioned
def with_system(batch: Mapping, system: str) -> dict:
    """Map function (`batched=True`): `system` as the first message of every conversation of
    `messages`; a conversation with a system message of its own raises `ValueError`."""
    for k, messages in enumerate(batch["messages"]):
        if messages and isinstance(messages[0], Mapping) and messages[0].get("role") == "system":
            raise ValueError(f"{STAGE}: row {k} of the batch has a system message of its own, and system= was given: "
                             "pass system=None to keep the data's, or remove them from `messages` first")
    return {"messages": [[{"role": "system", "content": system}, *messages] for messages in batch["messages"]]}


def prepare_sft_dataset(ds, system: Optional[str] = None):
    """Check `ds` (see `check_sft_dataset`) and return it as a `messages`-only dataset for TRL.

    Alpaca data is mapped with `to_messages`; other columns are dropped, so none of them (a
    `prompt`, `text` or `images` column) can change how TRL reads the data. A streaming
    `IterableDataset` cannot be checked without reading it all: its rows are checked as they
    are read (`to_messages` names a bad row). `system` goes first in every conversation, of a
    `messages` dataset too (`with_system`).
    """
    from datasets import IterableDataset

    if isinstance(ds, IterableDataset):
        if "messages" in (ds.column_names or []):
            ds = ds.select_columns(["messages"])
            return ds if system is None else ds.map(with_system, batched=True, fn_kwargs={"system": system})
        return ds.map(to_messages, batched=True, fn_kwargs={"system": system}).select_columns(["messages"])
    check_sft_dataset(ds)
    _warn_unreflected(ds)
    if "messages" not in ds.column_names:
        ds = ds.map(to_messages, batched=True, fn_kwargs={"system": system}, desc="Alpaca -> messages")
    elif system is not None:
        ds = ds.select_columns(["messages"]).map(with_system, batched=True, fn_kwargs={"system": system},
                                                 desc="system message")
    return ds.select_columns(["messages"])
