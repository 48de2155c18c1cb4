"""Benchmark `select_v2` (vectorised over Arrow columns) against a per-row loop in the reference's
style (`ds[i]` of each split, the decision tree in Python) on synthetic scored variants.

Prints one JSON line: rows, the seconds per row of both, `speedup`, and `agree` (both chose the
same rows on the rows the loop ran over).

    python scripts/bench_select.py --rows 50000 --loop-rows 5000
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000, help="rows per variant split for select_v2")
    parser.add_argument("--loop-rows", type=int, default=5_000, help="rows the per-row loop runs over")
    parser.add_argument("--missing", type=float, default=0.05, help="share of NaN scores")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def synthetic_variants(rows: int, missing: float, seed: int):
    """Four aligned splits with distinct texts, status ok, random ppl ratios with NaN."""
    from datasets import Dataset, DatasetDict

    from reflectune_hf.selection.select import VARIANT_SPLITS

    rng = np.random.default_rng(seed)
    splits = {}
    for name in VARIANT_SPLITS:
        scores = {c: rng.uniform(0.3, 1.4, rows) for c in ("ifd", "rifd")}
        for values in scores.values():
            values[rng.random(rows) < missing] = np.nan
        splits[name] = Dataset.from_dict({
            "id": np.arange(rows), "instruction": [f"{name} instruction {i}" for i in range(rows)],
            "input": [""] * rows, "output": [f"{name} answer {i}" for i in range(rows)],
            "reflection_status": ["ok"] * rows, **scores,
        })
    return DatasetDict(splits)


def per_row_loop(variants, rows: int) -> dict:
    """The reference's loop: one `ds[i]` per split and row, the tree in Python, NaN rows skipped."""
    ori, q, a, qa = (variants[s] for s in ("origin", "reflect_instruction", "reflect_response", "reflect_both"))
    chosen = {}
    for i in range(rows):
        o, iq, ia, iqa = ori[i], q[i], a[i], qa[i]
        kept, twin, name = (iq, iqa, "reflect_both") if iq["ifd"] > o["ifd"] else (o, ia, "reflect_response")
        values = (o["ifd"], iq["ifd"], kept["rifd"], twin["rifd"], twin["ifd"])
        if any(math.isnan(v) for v in values):
            continue
        if twin["rifd"] < kept["rifd"] and twin["rifd"] < 1 and twin["ifd"] < 1:
            chosen[o["id"]] = name
    return chosen


def main(args=None) -> dict:
    args = make_parser().parse_args(args)
    import datasets

    from reflectune_hf.selection.select import select_v2

    datasets.disable_progress_bars()
    variants = synthetic_variants(args.rows, args.missing, args.seed)
    start = time.perf_counter()
    selected = select_v2(variants)
    fast_s = time.perf_counter() - start

    loop_rows = min(args.loop_rows, args.rows)
    start = time.perf_counter()
    expected = per_row_loop(variants, loop_rows)
    loop_s = time.perf_counter() - start
    got = {i: s for i, s in zip(selected["id"], selected["source"]) if i < loop_rows}

    result = {
        "bench": "select_v2", "rows": args.rows, "selected": len(selected), "loop_rows": loop_rows,
        "select_v2_s": round(fast_s, 4), "select_v2_s_per_row": fast_s / args.rows,
        "loop_s_per_row": loop_s / loop_rows, "speedup": round((loop_s / loop_rows) / (fast_s / args.rows), 1),
        "agree": got == expected,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
