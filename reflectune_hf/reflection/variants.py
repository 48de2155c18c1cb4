"""The four aligned variants of Reflection-Tuning, the layout of the method's public releases.

`build_variants` chains the stages of `reflect` and `extract` with plain `Dataset.map` calls:

```
ds ─ CompressInstruction ─────────────────────────────────────────────────────── origin
origin ─ ReflectInstruction → extract_instruction_reflection ─────────────────── reflect_instruction
origin ─ ReflectResponse → extract_response_reflection ───────────────────────── reflect_response
reflect_instruction ─ ReflectResponse → extract_response_reflection ──────────── reflect_both
```

The splits have the same rows in the same order (aligned by `id`) and the same columns, so the
`DatasetDict` pushes to the Hub and loads back as one configuration:

- `id`, `instruction`, `input`, `output`: the pair of that variant.
- The compression columns of `CompressInstruction` (with `compress=True`).
- `reflection_status`: the status of the split's last reflection step (instruction reflection
  for `reflect_instruction`, response reflection for `reflect_response` and `reflect_both`; `""`
  for `origin`), the column `reflectune_hf.selection.select` reads.
- `format_outcome`: how that step's answer met the format (`oracles.stage_formats.format_outcome`:
  `first_try`, `after_reask`, `fallback`, `none`; `""` for `origin`), the measured format rate.
- `instruction_reflection_{raw,error,attempts,finish_reason,status}`: the instruction reflection
  behind the row (`reflect_instruction`, `reflect_both`); `""` / `0` in the other splits.
- `response_reflection_{raw,error,attempts,finish_reason,status}`: the response reflection
  behind the row (`reflect_response`, `reflect_both`); `""` / `0` in the other splits.

A status is one of `extract.STATUSES`; a row whose reflection failed keeps its previous pair and
says so, it is never dropped. In `reflect_both`, a row whose instruction reflection failed asks
the same response-reflection request as in `reflect_response`: the oracle cache answers it.

Every map is cached by `datasets` for Arrow-backed input: running `build_variants` again (in any
process, with the same oracle configuration) calls no oracle when the first run had no oracle
failure; when it had some, the stages run through `reflect.map_stage`, so the rerun sends exactly
the requests that failed (the oracle cache answers the others) and every later step is computed
again from the healed rows.

Variants built or scored elsewhere are checked and aligned for `reflectune_hf.selection.select` by
`check_variants` (the four splits and their columns), `align_by_id` (row positions by `id`) and
`unify_schema` (one type per column, e.g. float32 and float64 scores).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from ..data import ColumnError, empty_dataset, require_columns, to_alpaca
from ..oracles.stage_formats import format_outcome
from ..utils import versioned
from .extract import extract_instruction_reflection, extract_response_reflection
from .stages import CompressInstruction, NoOracle, ReflectInstruction, ReflectResponse, map_stage

logger = logging.getLogger(__name__)

VARIANT_SPLITS = ("origin", "reflect_instruction", "reflect_response", "reflect_both")
REFLECTION_FIELDS = ("raw", "error", "attempts", "finish_reason", "status")
# The columns build_variants writes and renames: input data that has one would clash with it.
WRITTEN_COLUMNS = frozenset({"format_outcome"} | {f"{prefix}reflection_{field}" for prefix in ("", "instruction_",
                            "response_") for field in REFLECTION_FIELDS})
# TRL's columns of the same pair: kept by the stages, they would describe the pair before reflection (and SFT or the
# published data would train on it), so input data that has one besides `instruction` / `output` is refused.
PAIR_COLUMNS = ("messages", "prompt", "completion")
SELECTION_COLUMNS = ("source",)  # select_v1 / select_v2 write it: the split a selected row comes from


def check_variants(variants, columns: Sequence[str] = (), stage: str = "check_variants") -> None:
    """Raise a `ColumnError` unless `variants` has the four splits (`VARIANT_SPLITS`), each with
    `columns`; the message names what is missing and what exists.

    Example:
        >>> from datasets import Dataset, DatasetDict
        >>> from reflectune_hf.reflection.variants import VARIANT_SPLITS, check_variants
        >>> one = Dataset.from_dict({"id": [0], "instruction": ["q"], "output": ["a"]})
        >>> check_variants(DatasetDict({s: one for s in VARIANT_SPLITS}), ["id", "output"])  # passes
    """
    present = list(getattr(variants, "keys", lambda: [])())
    missing = [s for s in VARIANT_SPLITS if s not in present]
    if missing:
        raise ColumnError(
            f"{stage} needs the variant split(s) {missing}, which are missing; the DatasetDict has "
            f"{present} (build them with reflectune_hf.reflection.variants.build_variants)"
        )
    for split in VARIANT_SPLITS:
        require_columns(variants[split], columns, f"{stage} (split {split!r})")


def align_by_id(ids: Mapping[str, Sequence], stage: str = "align_by_id") -> dict:
    """Positions that put each split's rows in `origin` order: `ids[split][positions[split]]`
    equals `ids["origin"]`. Raises a `ColumnError` on duplicate ids or different id sets.

    Args:
        ids: the `id` values of each split of `VARIANT_SPLITS` (any row order).
        stage: the name that opens error messages.

    Example:
        >>> from reflectune_hf.reflection.variants import align_by_id
        >>> ids = {"origin": [3, 5], "reflect_instruction": [5, 3], "reflect_response": [3, 5], "reflect_both": [5, 3]}
        >>> align_by_id(ids)["reflect_both"].tolist()
        [1, 0]
    """
    import numpy as np
    import pandas as pd

    origin_ids = pd.Index(np.asarray(ids["origin"]))
    positions = {}
    for split in VARIANT_SPLITS:
        split_ids = pd.Index(np.asarray(ids[split]))
        if not split_ids.is_unique:
            dup = split_ids[split_ids.duplicated()].unique()[:5].tolist()
            raise ColumnError(f"{stage}: split {split!r} has duplicate ids, e.g. {dup}")
        pos = split_ids.get_indexer(origin_ids)
        lacking, extra = origin_ids[pos < 0], split_ids.difference(origin_ids)
        if len(lacking) or len(extra):
            raise ColumnError(
                f"{stage}: the variant splits are not aligned by 'id': split {split!r} lacks "
                f"{len(lacking)} id(s) of 'origin' (e.g. {lacking[:5].tolist()}) and has {len(extra)} "
                f"id(s) that 'origin' lacks (e.g. {extra[:5].tolist()})"
            )
        positions[split] = pos.astype(np.int64)
    return positions


def _common_type(a, b):
    """The type two Arrow columns cast to without loss: the wider of two ints or two floats, the
    other one of a null type, large_string for string + large_string; None when there is none."""
    import pyarrow as pa

    if a == b or pa.types.is_null(b):
        return a
    if pa.types.is_null(a):
        return b
    for kind in (pa.types.is_signed_integer, pa.types.is_unsigned_integer, pa.types.is_floating):
        if kind(a) and kind(b):
            return a if a.bit_width >= b.bit_width else b
    return pa.large_string() if {a, b} == {pa.string(), pa.large_string()} else None


def unify_schema(splits: Mapping[str, Any], stage: str = "unify_schema") -> dict:
    """The splits reduced to their common columns (in the first split's order), each column cast
    to one type, so that `concatenate_datasets` takes them: splits scored or built apart may
    differ (float32 vs float64 `ifd`, int32 vs int64 `id`). Dropped columns are logged; a column
    without a lossless common type (string vs float) raises a `ColumnError` naming both types.

    Example:
        >>> from datasets import Dataset, Value
        >>> from reflectune_hf.reflection.variants import unify_schema
        >>> a = Dataset.from_dict({"id": [0], "ifd": [0.5]}).cast_column("ifd", Value("float32"))
        >>> b = Dataset.from_dict({"id": [1], "ifd": [0.25], "extra": [1]})
        >>> unify_schema({"a": a, "b": b})["a"].features["ifd"]
        Value('float64')
    """
    import pyarrow as pa
    from datasets import Features

    names = list(splits)
    common = [c for c in splits[names[0]].column_names if all(c in d.column_names for d in splits.values())]
    dropped = sorted({c for d in splits.values() for c in d.column_names} - set(common))
    if dropped:
        logger.warning("%s: columns %s are not in every split and are dropped", stage, dropped)
    out = {name: ds.select_columns(common) for name, ds in splits.items()}
    for column in common:
        types = {name: ds.features.arrow_schema.field(column).type for name, ds in out.items()}
        target = types[names[0]]
        for name in names[1:]:
            common_type = _common_type(target, types[name])
            if common_type is None:
                features = (out[names[0]].features[column], out[name].features[column])
                first, other = (getattr(f, "dtype", f) for f in features)
                raise ColumnError(f"{stage}: column {column!r} is {first} in split {names[0]!r} but {other} in "
                                  f"split {name!r}, with no lossless common type; cast one of them first (cast_column)")
            target = common_type
        feature = Features.from_arrow_schema(pa.schema([pa.field(column, target)]))[column]
        out = {name: ds if types[name] == target else ds.cast_column(column, feature) for name, ds in out.items()}
    return out


def _prefixed(ds, prefix: str):
    return ds.rename_columns({f"reflection_{f}": f"{prefix}_reflection_{f}" for f in REFLECTION_FIELDS})


# The reflection step whose status is a split's `reflection_status` (what `select` reads).
LAST_STEP = {"origin": None, "reflect_instruction": "instruction", "reflect_response": "response",
             "reflect_both": "response"}


@versioned  # hashed with the package version: an upgrade that changes the alignment recomputes it
def _finish_split(batch: dict, defaults: dict, last_step: Optional[str]) -> dict:
    n = len(next(iter(batch.values()))) if batch else 0
    out = {name: [value] * n for name, value in defaults.items()}
    out["reflection_status"] = list(batch[f"{last_step}_reflection_status"]) if last_step else [""] * n
    attempts = list(batch[f"{last_step}_reflection_attempts"]) if last_step else [0] * n
    out["format_outcome"] = ([format_outcome(s, a) for s, a in zip(out["reflection_status"], attempts)]
                             if last_step else [""] * n)
    return out


def _align(splits: dict) -> dict:
    """Give every split the same columns in one order: absent reflection columns filled with
    ""/0, and `reflection_status`, the status of the split's last reflection step."""
    from datasets import Features, Value

    order, features = [], {}
    for ds in splits.values():
        for name in ds.column_names:
            if name not in features:
                order.append(name)
                features[name] = ds.features[name]
    first_reflection = next(i for i, name in enumerate(order) if name.endswith("_reflection_raw"))
    order[first_reflection:first_reflection] = ["reflection_status", "format_outcome"]
    aligned = {}
    for split, ds in splits.items():
        missing = [name for name in features if name not in ds.column_names]
        defaults = {name: ("" if getattr(features[name], "dtype", "") in ("string", "large_string") else 0)
                    for name in missing}
        full = Features({**ds.features, **{name: features[name] for name in missing},
                         "reflection_status": Value("string"), "format_outcome": Value("string")})
        ds = ds.map(_finish_split, batched=True, fn_kwargs={"defaults": defaults, "last_step": LAST_STEP[split]},
                    features=full, desc=f"Aligning {split}")
        aligned[split] = ds.select_columns(order)
    return aligned


def build_variants(
    ds,
    oracle: Any,
    compress: bool = True,
    *,
    batch_size: int = 64,
    num_proc: Optional[int] = None,
    load_from_cache_file: Optional[bool] = None,
    **stage_kwargs,
):
    """Build the `DatasetDict` of the four aligned variants (`VARIANT_SPLITS`) of an Alpaca dataset.

    Args:
        ds: a `Dataset` with `instruction` and `output` (and optionally `input`, `id`); it goes
            through `reflectune_hf.data.to_alpaca`, which adds `id` when missing.
        oracle: any object with `complete(list[ChatRequest]) -> list[ChatResult]`.
        compress: fold inputs into instructions with `CompressInstruction` first (the method's
            stage 0). With `compress=False`, `origin` keeps its inputs, response reflection uses
            the with-input prompt, and instruction reflection folds the input into the instruction
            text (`merge_input=True`): an input is never dropped.
        batch_size: rows per map batch, that is per `oracle.complete` call.
        num_proc, load_from_cache_file: passed to every `Dataset.map`.
        **stage_kwargs: configuration of every stage (`prompt_set`, `max_tokens`, `temperature`,
            `top_p`, `seed`, `format_retries`, `retry_temperature`).

    Returns:
        `DatasetDict` with splits `origin`, `reflect_instruction`, `reflect_response`,
        `reflect_both`: same length, same `id` order, same columns (see the module docstring).
        A 0-row `ds` gives four 0-row splits with those columns, without an oracle call.

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.reflection.variants import build_variants
        >>> class Canned:
        ...     def complete(self, requests):
        ...         return [ChatResult(texts=["[New Instruction] Name two primes. [End] [New Answer] 2 and 3. [End]"
        ...                                   " [Better Answer] Two primes: 2 and 3. [End]"]) for _ in requests]
        >>> variants = build_variants(Dataset.from_dict({"instruction": ["A prime?"], "output": ["7"]}), Canned())
        >>> [variants[s][0]["output"] for s in variants]
        ['7', '2 and 3.', 'Two primes: 2 and 3.', 'Two primes: 2 and 3.']
        >>> variants["reflect_both"][0]["instruction_reflection_status"]
        'ok'
    """
    from datasets import Dataset, DatasetDict

    if not isinstance(ds, Dataset):
        raise TypeError(f"build_variants takes a datasets.Dataset, got {type(ds).__name__} (pick a split first)")
    ds = to_alpaca(ds, stage="build_variants")
    written = [c for c in ds.column_names if c in WRITTEN_COLUMNS]
    if written:
        raise ColumnError(f"build_variants: the data has the column(s) {written}, which build_variants writes (the "
                          f"output of an earlier reflection?); rename or remove them first: "
                          f"ds.remove_columns({written})")
    derived = [c for c in ds.column_names if c in PAIR_COLUMNS]
    if derived:
        raise ColumnError(f"build_variants: the data has the column(s) {derived} beside instruction / output: no stage "
                          f"rewrites them, so they would keep the pair before reflection (and SFT would train on it); "
                          f"remove them first: ds.remove_columns({derived})")
    if taken := [c for c in ds.column_names if c in SELECTION_COLUMNS]:
        raise ColumnError(f"build_variants: the data has the column(s) {taken}, which the selection writes (the "
                          f"split a selected row comes from) and would replace: rename them first, e.g. "
                          f"ds.rename_column({taken[0]!r}, 'origin_{taken[0]}')")
    options = dict(batched=True, batch_size=batch_size, num_proc=num_proc, load_from_cache_file=load_from_cache_file)
    if len(ds) == 0:  # `map` never calls a stage on 0 rows: the schema comes from a placeholder row
        splits = _reflect(_placeholder_row(ds), NoOracle(), compress, options, stage_kwargs)
        return DatasetDict({name: empty_dataset(splits[name].features) for name in VARIANT_SPLITS})
    splits = _reflect(ds, oracle, compress, options, stage_kwargs)

    ids = splits["origin"]["id"]
    for name in VARIANT_SPLITS[1:]:
        if list(splits[name]["id"]) != list(ids):  # a stage keeps every row in order: never expected
            raise RuntimeError(f"build_variants: split {name!r} is not aligned with 'origin' by id")
    for name in VARIANT_SPLITS[1:]:
        for prefix in ("instruction", "response"):
            counts = Counter(s for s in splits[name][f"{prefix}_reflection_status"] if s)
            if counts:
                logger.info("%s: %s reflection statuses %s", name, prefix, dict(counts))
    return DatasetDict({name: splits[name] for name in VARIANT_SPLITS})


def _reflect(ds, oracle: Any, compress: bool, options: dict, stage_kwargs: dict) -> dict:
    """The four aligned splits of an Alpaca dataset with ids (the chain of the module docstring)."""
    if compress:
        origin = map_stage(ds, CompressInstruction(oracle, **stage_kwargs), desc="Compressing instructions", **options)
    else:
        origin = ds
    reflect_instruction = map_stage(
        origin, ReflectInstruction(oracle, merge_input=True, **stage_kwargs), desc="Reflecting instructions", **options
    ).map(extract_instruction_reflection, desc="Extracting instructions", **options)
    reflect_instruction = _prefixed(reflect_instruction, "instruction")
    response_stage = ReflectResponse(oracle, **stage_kwargs)
    splits = {"origin": origin, "reflect_instruction": reflect_instruction}
    for name, source in (("reflect_response", origin), ("reflect_both", reflect_instruction)):
        reflected = map_stage(source, response_stage, desc=f"Reflecting responses ({name})", **options).map(
            extract_response_reflection, desc=f"Extracting responses ({name})", **options
        )
        splits[name] = _prefixed(reflected, "response")
    return _align(splits)


def _placeholder_row(ds):
    """One all-null row with the columns of the 0-row `ds` (text columns of unknown type as strings)."""
    from datasets import Dataset, Features, Value

    features = Features({name: Value("string") if name in ("instruction", "input", "output")
                         and getattr(feature, "dtype", None) == "null" else feature
                         for name, feature in ds.features.items()})
    return to_alpaca(Dataset.from_dict({name: [None] for name in features}, features=features))
