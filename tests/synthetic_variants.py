"""Realistic synthetic variant DatasetDicts for selection and report tests.

`make_variants(sample, seed)` turns Alpaca rows into the four aligned splits the reflection
stages produce (`origin`, `reflect_instruction`, `reflect_response`, `reflect_both`), with the
column types of the real stages: `reflection_status` strings (some fallbacks and failures that
keep the previous text, as the extractor does), the scorer's float columns with NaN where a row
could not be scored and `score_status`. Each split is shuffled, so alignment must go by `id`.
"""

from __future__ import annotations

import math

import numpy as np
from datasets import Dataset, DatasetDict

SCORE_PARTS = ("ins_alone", "out_alone", "ins_condition", "out_condition")


def _scores(rng: np.random.Generator, n: int, missing_rate: float) -> dict:
    """The scorer's columns: four losses, their ppl, ppl and loss ratios, NaN + status when unscored."""
    cols = {}
    losses = {p: rng.uniform(0.8, 3.5, n) for p in ("ins_alone", "out_alone")}
    losses["ins_condition"] = losses["ins_alone"] * rng.uniform(0.6, 1.15, n)
    losses["out_condition"] = losses["out_alone"] * rng.uniform(0.6, 1.15, n)
    unscored = rng.random(n) < missing_rate
    for part in SCORE_PARTS:
        loss = np.where(unscored, np.nan, losses[part])
        cols[f"loss_{part}"] = loss.tolist()
        cols[f"ppl_{part}"] = np.exp(loss).tolist()
    ppl = {p: np.asarray(cols[f"ppl_{p}"]) for p in SCORE_PARTS}
    cols["ifd"] = (ppl["out_condition"] / ppl["out_alone"]).tolist()
    cols["rifd"] = (ppl["ins_condition"] / ppl["ins_alone"]).tolist()
    cols["ifd_loss"] = (np.asarray(cols["loss_out_condition"]) / np.asarray(cols["loss_out_alone"])).tolist()
    cols["rifd_loss"] = (np.asarray(cols["loss_ins_condition"]) / np.asarray(cols["loss_ins_alone"])).tolist()
    cols["score_status"] = ["empty_output" if u else "ok" for u in unscored]
    return cols


def make_variants(sample: Dataset, seed: int = 0, missing_rate: float = 0.1, fallback_rate: float = 0.2) -> DatasetDict:
    """Four aligned, scored, shuffled variant splits built from `sample` (with `id`)."""
    rng = np.random.default_rng(seed)
    rows = sample.to_list()
    n = len(rows)
    ins_status = rng.choice(["ok", "instruction_fallback", "failed", "oracle_error"], n, p=[0.7, 0.1, 0.1, 0.1])
    res_status = {s: rng.choice(["ok", "output_fallback", "failed", "oracle_error"], n,
                                p=[1 - fallback_rate, fallback_rate / 2, fallback_rate / 4, fallback_rate / 4])
                  for s in ("reflect_response", "reflect_both")}
    origin = [dict(r) for r in rows]
    q = []
    for r, st in zip(rows, ins_status):
        new = dict(r)
        if st in ("ok", "output_fallback"):
            new["instruction"] = f"{r['instruction']} Explain your reasoning step by step and give an example."
            new["input"] = ""
        if st in ("ok", "instruction_fallback"):
            new["output"] = f"Here is a detailed answer.\n\n{r['output']}\n\nIn short: {r['output'][:40]}"
        new["reflection_status"] = str(st)
        q.append(new)

    def reflect_response(base: list[dict], statuses) -> list[dict]:
        out = []
        for r, st in zip(base, statuses):
            new = dict(r)
            if st == "ok":
                new["output"] = f"{r['output']}\n\nA better, more complete answer adds context and checks the facts."
            new["reflection_status"] = str(st)
            out.append(new)
        return out

    splits = {
        "origin": origin,
        "reflect_instruction": q,
        "reflect_response": reflect_response(origin, res_status["reflect_response"]),
        "reflect_both": reflect_response(q, res_status["reflect_both"]),
    }
    result = {}
    for name, records in splits.items():
        cols = {k: [r.get(k, None) for r in records] for k in records[0]}
        if "reflection_status" not in cols and name != "origin":
            cols["reflection_status"] = ["ok"] * n
        cols.update(_scores(rng, n, missing_rate))
        ds = Dataset.from_dict(cols)
        result[name] = ds.select(rng.permutation(n))  # row order differs: align by id
    return DatasetDict(result)


def is_valid(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
