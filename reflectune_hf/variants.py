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
  for `origin`), the column `reflectune_hf.select` reads.
- `instruction_reflection_{raw,error,attempts,finish_reason,status}`: the instruction reflection
  behind the row (`reflect_instruction`, `reflect_both`); `""` / `0` in the other splits.
- `response_reflection_{raw,error,attempts,finish_reason,status}`: the response reflection
  behind the row (`reflect_response`, `reflect_both`); `""` / `0` in the other splits.

A status is one of `extract.STATUSES`; a row whose reflection failed keeps its previous pair and
says so, it is never dropped. In `reflect_both`, a row whose instruction reflection failed asks
the same response-reflection request as in `reflect_response`: the oracle cache answers it.

Every map is cached by `datasets` for Arrow-backed input: running `build_variants` again (in any
process, with the same oracle configuration) calls no oracle.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

from .data import to_alpaca
from .extract import extract_instruction_reflection, extract_response_reflection
from .reflect import CompressInstruction, ReflectInstruction, ReflectResponse

logger = logging.getLogger(__name__)

VARIANT_SPLITS = ("origin", "reflect_instruction", "reflect_response", "reflect_both")
REFLECTION_FIELDS = ("raw", "error", "attempts", "finish_reason", "status")


def _prefixed(ds, prefix: str):
    return ds.rename_columns({f"reflection_{f}": f"{prefix}_reflection_{f}" for f in REFLECTION_FIELDS})


# The reflection step whose status is a split's `reflection_status` (what `select` reads).
LAST_STEP = {"origin": None, "reflect_instruction": "instruction", "reflect_response": "response",
             "reflect_both": "response"}


def _finish_split(batch: dict, defaults: dict, last_step: Optional[str]) -> dict:
    n = len(next(iter(batch.values()))) if batch else 0
    out = {name: [value] * n for name, value in defaults.items()}
    out["reflection_status"] = list(batch[f"{last_step}_reflection_status"]) if last_step else [""] * n
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
    order.insert(first_reflection, "reflection_status")
    aligned = {}
    for split, ds in splits.items():
        missing = [name for name in features if name not in ds.column_names]
        defaults = {name: ("" if getattr(features[name], "dtype", "") in ("string", "large_string") else 0)
                    for name in missing}
        full = Features({**ds.features, **{name: features[name] for name in missing},
                         "reflection_status": Value("string")})
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

    Example:
        >>> from datasets import Dataset
        >>> from reflectune_hf.oracles.base import ChatResult
        >>> from reflectune_hf.variants import build_variants
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
    options = dict(batched=True, batch_size=batch_size, num_proc=num_proc, load_from_cache_file=load_from_cache_file)
    if compress:
        origin = ds.map(CompressInstruction(oracle, **stage_kwargs), desc="Compressing instructions", **options)
    else:
        origin = ds
    reflect_instruction = origin.map(
        ReflectInstruction(oracle, merge_input=True, **stage_kwargs), desc="Reflecting instructions", **options
    ).map(extract_instruction_reflection, desc="Extracting instructions", **options)
    reflect_instruction = _prefixed(reflect_instruction, "instruction")
    response_stage = ReflectResponse(oracle, **stage_kwargs)
    splits = {"origin": origin, "reflect_instruction": reflect_instruction}
    for name, source in (("reflect_response", origin), ("reflect_both", reflect_instruction)):
        reflected = source.map(response_stage, desc=f"Reflecting responses ({name})", **options).map(
            extract_response_reflection, desc=f"Extracting responses ({name})", **options
        )
        splits[name] = _prefixed(reflected, "response")
    splits = _align(splits)

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
