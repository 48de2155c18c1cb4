"""`map_stage`: run an oracle stage over a dataset so that a rerun heals the rows that failed.

`ds.map(stage, batched=True)` on an Arrow-backed dataset is cached by `datasets` under a
fingerprint of the data and the stage's configuration, so the same `map` in a later process
replays the cached Arrow file, failed rows (`oracle_error`) included, and sends nothing: the
failures would never heal. `map_stage` makes the same call and, when its result came from the
datasets cache with failed rows, maps again under a new fingerprint (the hash of the failed
result's fingerprint and of the failed rows' positions): the oracle cache answers every request
that succeeded before (nothing is sent) and the failed ones are sent again. It follows that chain
(each hop may itself come from an earlier rerun's cache) until a result is clean or computed in
this call. Each content state has its own fingerprint, so maps after it (extraction, scoring)
cached on a failed state are never reused for a healed one.

A run that left no failed row replays from the cache: 0 requests, and a local oracle loads no
model. With `cache_file_name=<path>` (which `map` replays whatever the fingerprint, in-memory
datasets too) a heal is written next to it, as `<path stem>-heal-<fingerprint><suffix>`. The
fingerprint leaves out the map arguments that change only how rows are computed (`batch_size`,
`num_proc`: `stage_fingerprint`).
In-memory datasets without it, `IterableDataset`s and `load_from_cache_file=False` get a plain
`map`. A 0-row dataset (which `map` returns without calling the stage) gets the
stage's output columns (`stage.output_features`) with 0 rows.

A stage takes part when it has an `error_column` (non-empty exactly for the rows whose request
failed) or a `failed_rows(dataset)` method, or when the caller says which rows failed
(`failed=status_failures("sample_status")`: the rows whose status is `oracle_error`, for the Tuna
and evaluation stages); any other function gets a plain `map`.

Example:
    >>> from datasets import Dataset
    >>> from reflectune_hf.oracles.base import ChatResult
    >>> from reflectune_hf.reflection.stages import ReflectResponse
    >>> from reflectune_hf.oracles.rerun import map_stage
    >>> class Canned:
    ...     def complete(self, requests):
    ...         return [ChatResult(texts=["[Better Answer] Robin. [End]"]) for _ in requests]
    >>> ds = Dataset.from_dict({"instruction": ["Name a bird."], "output": ["Cat."]})
    >>> list(map_stage(ds, ReflectResponse(Canned()))["reflection_raw"])
    ['[Better Answer] Robin. [End]']
    >>> map_stage(ds.select([]), ReflectResponse(Canned())).column_names[-2:]
    ['reflection_attempts', 'reflection_finish_reason']
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Callable, Optional

from ..utils import stable_hash

logger = logging.getLogger(__name__)


def status_failures(column: str, status: str = "oracle_error") -> Callable[[Any], list[int]]:
    """`failed` for `map_stage`: the positions of the rows whose `column` is `status`.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.rerun import status_failures
        >>> status_failures("sample_status")(Dataset.from_dict({"sample_status": ["ok", "oracle_error"]}))
        [1]
    """

    def failed(dataset) -> list[int]:
        if column not in dataset.column_names:
            return []
        return [i for i, value in enumerate(dataset[column]) if value == status]

    return failed


def failed_rows(dataset, stage: Any, failed: Optional[Callable[[Any], list[int]]] = None) -> list[int]:
    """Positions of the rows of `dataset` (a stage's result) whose request failed: `failed(dataset)`
    when given, else `stage.failed_rows` when the stage has it, else the rows where
    `stage.error_column` is non-empty, else none."""
    if failed is not None:
        return list(failed(dataset))
    method = getattr(stage, "failed_rows", None)
    if callable(method):
        return list(method(dataset))
    column = getattr(stage, "error_column", None)
    if not column or column not in dataset.column_names:
        return []
    return [i for i, error in enumerate(dataset[column]) if error]


def _cache_snapshot(dataset, cache_file_name: Optional[str] = None) -> dict:
    """`{path: mtime_ns}` of the Arrow files next to `dataset`'s cache files and `cache_file_name`
    (where `map` writes)."""
    snapshot = {}
    folders = {os.path.dirname(os.path.abspath(f["filename"])) for f in dataset.cache_files}
    if cache_file_name:
        folders.add(os.path.dirname(os.path.abspath(cache_file_name)))
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".arrow"):
                    snapshot[entry.path] = entry.stat().st_mtime_ns
    return snapshot


def _replayed(result, before: dict) -> bool:
    """True when every cache file of `result` existed, unchanged, before the map: a cache replay."""
    files = [os.path.abspath(f["filename"]) for f in result.cache_files]
    if not files:
        return False
    for path in files:
        try:
            if before.get(path) != os.stat(path).st_mtime_ns:
                return False
        except OSError:
            return False
    return True


def _empty_result(dataset, stage: Any, map_kwargs: dict):
    """What `dataset.map(stage, **map_kwargs)` of a 0-row `dataset` would hold: its columns less
    `remove_columns`, plus the stage's output columns (and `id` where the stage adds it)."""
    from ..data import ID_COLUMN, add_empty_columns
    from .stage import OracleCaller

    columns = dict(getattr(stage, "output_features", None) or {})
    if map_kwargs.get("with_indices") and isinstance(stage, OracleCaller) and ID_COLUMN not in dataset.column_names:
        columns = {ID_COLUMN: "int64", **columns}
    removed = map_kwargs.get("remove_columns") or []
    removed = [removed] if isinstance(removed, str) else list(removed)
    return add_empty_columns(dataset.remove_columns([c for c in removed if c not in columns]), columns)


# `Dataset.map` arguments that change how rows are computed, not what: left out of a stage's fingerprint.
RUNTIME_MAP_KWARGS = frozenset({"batch_size", "writer_batch_size", "num_proc", "desc", "load_from_cache_file",
                                "cache_file_name", "keep_in_memory", "new_fingerprint"})


def stage_fingerprint(dataset, stage: Any, map_kwargs: dict) -> str:
    """The fingerprint of `dataset.map(stage, **map_kwargs)` that `map_stage` gives it: as datasets'
    own (the dataset's fingerprint, the pickled stage, the map arguments) but without the ones in
    `RUNTIME_MAP_KWARGS`: datasets keys a map by its `batch_size`, so a rerun with another
    `--reflect_batch_size` or `--score_batch_size` computed every row again (the stages' outputs do
    not depend on it). With `drop_last_batch` the batch size decides which rows are kept: it stays."""
    from datasets.fingerprint import Hasher

    kept = {k: v for k, v in sorted(map_kwargs.items())
            if k not in RUNTIME_MAP_KWARGS or (k == "batch_size" and map_kwargs.get("drop_last_batch"))}
    return Hasher.hash({"map_stage": dataset._fingerprint, "function": stage, "kwargs": kept})


def map_stage(dataset, stage: Any, *, failed: Optional[Callable[[Any], list[int]]] = None, **map_kwargs):
    """`dataset.map(stage, batched=True, **map_kwargs)`, healing rows the datasets cache replays as
    failed (see the module docstring): the one call to run an oracle stage.

    Args:
        dataset: a `Dataset`, a `DatasetDict` (each split in turn; `cache_file_names` as
            `DatasetDict.map` takes it) or an `IterableDataset` (a plain lazy `map`, without the
            options it does not take, such as `desc` or `num_proc`).
        stage: an oracle stage (`CompressInstruction`, `ReflectInstruction`, `ReflectResponse`, or
            any callable with an `error_column` or a `failed_rows(dataset)` method).
        failed: the positions of the failed rows of a result (e.g. `status_failures(column)`),
            for a stage that has neither `error_column` nor `failed_rows`.
        **map_kwargs: passed to `Dataset.map` (`batched=True` unless given; `batch_size`,
            `num_proc`, `desc`, `load_from_cache_file`, ...).

    Returns:
        The mapped dataset: clean, or computed in this call (its failures are this run's).
    """
    from datasets import Dataset, DatasetDict

    map_kwargs.setdefault("batched", True)
    if isinstance(dataset, DatasetDict):  # its own `map` would be a plain one per split
        names = map_kwargs.pop("cache_file_names", None) or {}
        return DatasetDict({name: map_stage(split, stage, failed=failed, **map_kwargs, **(
            {"cache_file_name": names[name]} if names.get(name) else {})) for name, split in dataset.items()})
    if not isinstance(dataset, Dataset):  # IterableDataset.map takes no desc, num_proc, cache options
        accepted = inspect.signature(dataset.map).parameters
        return dataset.map(stage, **{k: v for k, v in map_kwargs.items() if k in accepted})
    if len(dataset) == 0:
        return _empty_result(dataset, stage, map_kwargs)
    cache_file_name = map_kwargs.get("cache_file_name")
    plain = ((not dataset.cache_files and not cache_file_name) or map_kwargs.get("load_from_cache_file") is False
             or map_kwargs.get("keep_in_memory"))
    if plain:
        return dataset.map(stage, **map_kwargs)
    map_kwargs.setdefault("new_fingerprint", stage_fingerprint(dataset, stage, map_kwargs))
    before = _cache_snapshot(dataset, cache_file_name)
    result = dataset.map(stage, **map_kwargs)
    map_kwargs.pop("new_fingerprint", None)  # a given one names the first map; a heal has its own
    while _replayed(result, before):
        rows = failed_rows(result, stage, failed)
        if not rows:
            break
        fingerprint = stable_hash({"heal": result._fingerprint, "failed": rows}, length=32)
        logger.info("%s: %d row(s) of the cached result failed; mapping again to retry them (fingerprint %s)",
                    getattr(stage, "stage_name", type(stage).__name__), len(rows), fingerprint)
        if cache_file_name:  # `map` replays a named file whatever the fingerprint: the heal gets its own
            stem, suffix = os.path.splitext(cache_file_name)
            map_kwargs["cache_file_name"] = f"{stem}-heal-{fingerprint}{suffix}"
        before = _cache_snapshot(dataset, cache_file_name)
        result = dataset.map(stage, new_fingerprint=fingerprint, **map_kwargs)
    return result
