"""The data model: Alpaca rows with a stable `id`, column checks, the bundled sample, loaders.

Every stage of the pipeline reads and writes plain `datasets.Dataset` columns:

- `id` (int): the row's identity, added once by `add_ids` and kept by every stage, so the four
  variants of a row can be aligned after reflection.
- `instruction`, `input`, `output` (str): the Alpaca pair; `input` may be empty.

Example:
    >>> from reflectune_hf.data import load_sample
    >>> ds = load_sample()
    >>> ds.column_names
    ['instruction', 'input', 'output', 'id']
    >>> len(ds)
    40
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

from .utils import dataset_from_records, id_problem, versioned

ALPACA_COLUMNS = ("instruction", "input", "output")
ID_COLUMN = "id"
SAMPLE_FILE = "sample_alpaca.jsonl"
_BATCH_HINT = "map a stage with batched=True, without input_columns, on a dataset without a pandas or arrow format"


class ColumnError(ValueError):
    """A dataset or batch lacks columns a stage needs, or holds values of the wrong type."""


def _columns_of(data) -> list[str]:
    if hasattr(data, "column_names") and hasattr(data, "features"):  # a datasets object, not an arrow batch
        names = data.column_names
        if isinstance(names, dict):  # DatasetDict: the columns of its first split
            names = next(iter(names.values()), [])
        return list(names)
    if isinstance(data, Mapping):
        return list(data.keys())
    raise TypeError(f"Expected a Dataset or a batch dict, got {type(data).__name__}: {_BATCH_HINT}")


def require_columns(data, required: Iterable[str], stage: str) -> None:
    """Raise `ColumnError` naming what `stage` needs, what is missing and what exists.

    `data` is a `Dataset`, a `DatasetDict` or a batch dict (what `map(batched=True)` passes).

    Example:
        >>> from reflectune_hf.data import require_columns
        >>> require_columns({"instruction": ["hi"]}, ["instruction", "output"], "ReflectResponse")
        Traceback (most recent call last):
        ...
        reflectune_hf.data.ColumnError: ReflectResponse needs the column(s) ['output'], which are missing; the data has ['instruction']
    """
    present = _columns_of(data)
    missing = [c for c in required if c not in present]
    if missing:
        raise ColumnError(f"{stage} needs the column(s) {missing}, which are missing; the data has {present}")


def text_column(batch: Mapping, name: str, stage: str) -> list[str]:
    """The values of a string column of a batch, `None` read as `""`; other types raise.

    Example:
        >>> from reflectune_hf.data import text_column
        >>> text_column({"input": ["a", None]}, "input", "demo")
        ['a', '']
    """
    require_columns(batch, [name], stage)
    values = list(batch[name])
    for i, value in enumerate(values):
        if value is None:
            values[i] = ""
        elif not isinstance(value, str):
            raise ColumnError(
                f"{stage}: column {name!r} must hold strings, but row {i} of the batch holds "
                f"{type(value).__name__} ({value!r:.60})"
            )
    return values


def batch_size_of(batch: Mapping) -> int:
    """Number of rows in a batch dict (0 for a batch with no columns); `ColumnError` for one example."""
    for name, values in batch.items():  # a str or a scalar: mapped without batched=True
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ColumnError(f"column {name!r} holds one value ({type(values).__name__}), not a batch: map this "
                              "function with batched=True (or run the stage with map_stage)")
    return len(next(iter(batch.values()), ()))


def _with_id(example, idx):
    return {ID_COLUMN: idx}


def _with_id_unless_present(example, idx):
    return {} if example.get(ID_COLUMN) is not None else {ID_COLUMN: idx}


def add_ids(ds):
    """Add an integer `id` column (the row index) unless the dataset already has one.

    Ids are assigned once, before any stage runs, and every stage keeps them, so rows of the
    reflected variants align with their origin by `id` (`build_variants` adds them; a single
    stage needs none). Existing ids must be unique, none None or NaN (checked on a `Dataset`; an
    `IterableDataset` is not read here: its ids are added lazily, row by row, where a row has none).

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.data import add_ids
        >>> list(add_ids(Dataset.from_dict({"instruction": ["a", "b"]}))["id"])
        [0, 1]
    """
    from datasets import IterableDataset

    if isinstance(ds, IterableDataset):
        if ds.column_names is not None and ID_COLUMN in ds.column_names:
            return ds
        return ds.map(_with_id_unless_present, with_indices=True)
    if ID_COLUMN in ds.column_names:
        if problem := id_problem(ds[ID_COLUMN]):
            raise ColumnError(f"Column {ID_COLUMN!r} {problem}: fix the ids, or drop the column "
                              f"(ds.remove_columns({ID_COLUMN!r})) to number the rows 0..n-1")
        return ds
    return ds.map(_with_id, with_indices=True, desc="Adding ids")


def empty_dataset(features):
    """A clean 0-row `Dataset` with these `Features` (or a dict of them). Prefer it to
    `ds.select([])`: datasets rejects `add_column` on an empty selection of a larger table.

    Example:
        >>> from datasets import Features, Value
        >>> from reflectune_hf.data import empty_dataset
        >>> empty_dataset(Features({"id": Value("int64")})).add_column("x", []).column_names
        ['id', 'x']
    """
    from datasets import Dataset, Features

    return Dataset.from_dict({name: [] for name in features}, features=Features(features))


def add_empty_columns(dataset, columns: Mapping):
    """A 0-row `dataset` plus the `columns` it lacks, typed: what a function mapped over it would
    have written (`Dataset.map` returns a 0-row dataset without calling the function).

    Args:
        dataset: a `Dataset` with 0 rows.
        columns: name -> a dtype name (`"float64"`, `"string"`), `[dtype]` for a list of it, or
            a `datasets` feature. Columns the dataset has keep their type.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.data import add_empty_columns
        >>> empty = add_empty_columns(Dataset.from_dict({"id": []}), {"ifd": "float64", "by_model": ["float64"]})
        >>> empty.column_names, empty.features["ifd"], len(empty)
        (['id', 'ifd', 'by_model'], Value('float64'), 0)
    """
    from datasets import Features, List, Value

    if len(dataset):
        raise ValueError(f"add_empty_columns: the dataset has {len(dataset)} rows; it is for 0-row results")

    def feature(spec):
        if isinstance(spec, list):
            return List(feature(spec[0]))
        return Value(spec) if isinstance(spec, str) else spec

    features = dict(dataset.features)
    for name, spec in columns.items():
        features.setdefault(name, feature(spec))
    return empty_dataset(Features(features))


@versioned
def _fill_input(batch):
    n = batch_size_of(batch)
    return {"input": [v if isinstance(v, str) else "" for v in batch.get("input", [""] * n)]}


def to_alpaca(ds, stage: str = "to_alpaca"):
    """Check the Alpaca columns and normalise them: an absent `input` column becomes `""`,
    `None` inputs become `""`, and an `id` column is added when missing.

    Raises `ColumnError` when `instruction` or `output` is missing or not a string column.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.data import to_alpaca
        >>> ds = to_alpaca(Dataset.from_dict({"instruction": ["Say hi"], "output": ["Hi"]}))
        >>> ds[0]
        {'instruction': 'Say hi', 'output': 'Hi', 'input': '', 'id': 0}
    """
    require_columns(ds, ["instruction", "output"], stage)
    for name in ("instruction", "output", "input"):
        if name in ds.column_names:
            dtype = getattr(ds.features[name], "dtype", None)
            if dtype not in ("string", "large_string", "null"):
                raise ColumnError(f"{stage}: column {name!r} must be a string column, got {ds.features[name]}")
    if "input" not in ds.column_names or ds.features["input"].dtype == "null" or None in ds["input"]:
        ds = ds.map(_fill_input, batched=True, desc="Normalising input")
    return add_ids(ds)


def sample_path() -> Path:
    """Path of the bundled 40-row sample (`reflectune_hf/data/sample_alpaca.jsonl`)."""
    return Path(str(resources.files("reflectune_hf").joinpath("data", SAMPLE_FILE)))


def load_sample(with_ids: bool = True):
    """The bundled sample: 40 Alpaca rows written for this project, as an Arrow-backed Dataset.

    A realistic mix over writing, reasoning, coding, maths and facts: about a third of the
    rows are deliberately weak (terse, vague, wrong or mismatched) and 10 rows have an `input`.

    Example:
        >>> from reflectune_hf import load_sample
        >>> ds = load_sample()
        >>> sum(1 for x in ds["input"] if x)
        10
    """
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(sample_path()), split="train")
    return add_ids(ds) if with_ids else ds


DATA_SUFFIXES = (".json", ".jsonl", ".parquet")


def _message_text(message, where: str, role: str) -> str:
    if not isinstance(message, Mapping) or message.get("role") != role:
        got = message.get("role") if isinstance(message, Mapping) else type(message).__name__
        raise ColumnError(f"{where}: expected a {role!r} message, got {got!r}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise ColumnError(f"{where}: the {role} message's content must be a string, got {type(content).__name__}")
    return content or ""


def _single_turn(messages, where: str) -> tuple[str, str, str]:
    """(system, user, assistant) of `[system?, user, assistant]`; anything else raises."""
    if not isinstance(messages, list):
        raise ColumnError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    roles = [m.get("role") if isinstance(m, Mapping) else None for m in messages]
    system = ""
    if roles[:1] == ["system"]:
        system = _message_text(messages[0], where, "system")
        messages, roles = messages[1:], roles[1:]
    if roles != ["user", "assistant"]:
        raise ColumnError(f"{where} is not a single-turn conversation (roles {roles}): reflectune recycles "
                          "one instruction and one response per row; split or drop multi-turn rows first")
    return system, _message_text(messages[0], where, "user"), _message_text(messages[1], where, "assistant")


@versioned
def chat_to_alpaca(batch: Mapping, indices: Sequence[int]) -> dict:
    """Map function (`batched=True, with_indices=True`): TRL-format rows to Alpaca columns.

    Reads `messages` (`[system?, user, assistant]`), or `prompt` / `completion`: strings
    (TRL's standard format) or message lists (its conversational format, `prompt` =
    `[system?, user]`, `completion` = `[assistant]`). Writes `instruction` (the user turn), `input`
    (the row's `input` column, else `""`), `output` (the assistant turn) and `system` (the system
    turn, else the row's `system` column, else `""`). A multi-turn row raises `ColumnError`.

    Example:
        >>> from reflectune_hf.data import chat_to_alpaca
        >>> chat_to_alpaca({"messages": [[{"role": "user", "content": "Hi?"},
        ...                               {"role": "assistant", "content": "Hello."}]]}, [0])
        {'instruction': ['Hi?'], 'input': [''], 'output': ['Hello.'], 'system': ['']}
    """
    out: dict = {"instruction": [], "input": [], "output": [], "system": []}
    for k, index in enumerate(indices):
        where = f"row {index}"
        if "messages" in batch:
            system, user, assistant = _single_turn(batch["messages"][k], where)
        else:
            prompt, completion = batch["prompt"][k], batch["completion"][k]
            if isinstance(prompt, list) or isinstance(completion, list):
                system, user, assistant = _single_turn(list(prompt or []) + list(completion or []), where)
            elif (prompt is None or isinstance(prompt, str)) and (completion is None or isinstance(completion, str)):
                system, user, assistant = "", prompt or "", completion or ""
            else:
                raise ColumnError(f"{where}: prompt and completion must be strings or message lists")
        own = {c: batch[c][k] or "" for c in ("input", "system") if c in batch}  # the row's own columns stay
        for name, value in (("instruction", user), ("input", own.get("input", "")), ("output", assistant),
                            ("system", system or own.get("system", ""))):
            out[name].append(value)
    return out


def from_chat_format(ds):
    """Alpaca columns for TRL-format data (`chat_to_alpaca`): a dataset with `messages`, or `prompt` and
    `completion`, and no `instruction` / `output` is converted (the others kept); any other is returned as is.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.data import from_chat_format
        >>> ds = from_chat_format(Dataset.from_dict({"prompt": ["2+2?"], "completion": ["4"]}))
        >>> ds[0]
        {'instruction': '2+2?', 'input': '', 'output': '4', 'system': ''}
    """
    columns = ds.column_names
    if "instruction" in columns or "output" in columns:
        return ds
    if "messages" in columns:
        source = ["messages"]
    elif "prompt" in columns and "completion" in columns:
        source = ["prompt", "completion"]
    else:
        return ds
    clashing = [c for c in ("input", "system") if c in columns]
    return ds.map(chat_to_alpaca, batched=True, with_indices=True, remove_columns=source + clashing,
                  desc=f"{' / '.join(source)} -> Alpaca")


def _looks_like_a_path(text: str) -> bool:
    """A string that names a local file or folder rather than a Hub id (`owner/name`)."""
    return (text.startswith(("/", "~", ".")) or text.lower().endswith(DATA_SUFFIXES + (".csv",))
            or text.count("/") > 1 or "\\" in text)


def load_data(source: Union[str, Path], split: str = "train"):
    """Load Alpaca data from `"sample"`, a local JSON/JSONL/Parquet file, a directory saved with
    `save_to_disk`, or a Hub dataset id; the result goes through `to_alpaca`.

    TRL-format data (`messages`, `prompt` / `completion`) is converted on load (`from_chat_format`);
    a multi-turn row is refused naming it. A local path that does not exist is reported as such
    (not looked up on the Hub); a saved folder without `split` names the splits it holds.

    Example:
        >>> from reflectune_hf.data import load_data
        >>> len(load_data("sample"))
        40
    """
    import datasets

    text = str(source)
    if text == "sample":
        return load_sample()
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} holds the splits {list(ds)}, not {split!r}: pick one with split=")
            ds = ds[split]
    elif path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: use .json, .jsonl or .parquet")
        ds = load_data_file(builder, path, split="train")
    elif path.exists():
        raise ValueError(f"{path} is neither a data file nor a directory saved with save_to_disk")
    elif _looks_like_a_path(text):
        raise FileNotFoundError(f"{text}: no such file or directory (a local path; a Hub dataset id is "
                                "`name` or `owner/name`)")
    else:
        ds = datasets.load_dataset(text, split=split)
    return to_alpaca(from_chat_format(ds))


def load_data_file(builder: str, path: Union[str, Path], split: Optional[str] = None):
    """`datasets.load_dataset(builder, data_files=path, split=split)`; a file of blanks or `[]` raises a
    `ValueError` naming it (datasets would say `Instruction "train" corresponds to no data!`)."""
    import datasets

    if Path(path).stat().st_size < 2**16 and "".join(Path(path).read_text(errors="replace").split()) in ("", "[]"):
        raise ValueError(f"{path} holds no rows (an empty file or JSON array): give data with at least one row")
    return datasets.load_dataset(builder, data_files=str(path), split=split)


def read_records(path: Union[str, Path]) -> list[dict]:
    """The rows of a JSON array or JSON lines file, as dicts. A file that is not JSON, holds no
    row, or holds a row that is not a JSON object raises `ValueError` naming the file.

    Example:
        >>> from reflectune_hf.data import read_records, sample_path
        >>> len(read_records(sample_path()))
        40
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON or JSON lines: {err}") from err
    if not rows:
        raise ValueError(f"{path} holds no rows")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} is a {type(rows[bad]).__name__}, expected a JSON object")
    return rows


def arrow_columns(ds, columns: Sequence[str]):
    """Some columns of `ds` as one Arrow table, honouring an indices mapping (`select`/`filter`/`shuffle`)."""
    return ds.with_format("arrow", columns=list(columns))[:]


def text_array(table, name: str):
    """A column of an Arrow table as strings, with nulls (a null-typed or absent column too) as ""."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        return pa.array([""] * table.num_rows, pa.string())
    return pc.fill_null(pc.cast(table[name], pa.string()), "")


def records_to_dataset(records: Sequence[Mapping]):
    """An in-memory Dataset from a list of Alpaca dicts (every key of any row), normalised by `to_alpaca`."""
    return to_alpaca(dataset_from_records([dict(r) for r in records]))
