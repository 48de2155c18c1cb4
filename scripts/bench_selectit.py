"""Benchmark: `SelectITScorer` (batched, left-padded, last-position head) against the reference
code's way (a per-row, per-prompt loop at batch size 1 with the full logits tensor), on the same
rows, the same loaded models and the same formulas, in the same run.

Prints one JSON line: both wall times, the speedup and the largest score difference.

    python scripts/bench_selectit.py --rows 16 --k 5
    python scripts/bench_selectit.py --models smollm2-135m-instruct,gemma3-270m --rows 8
    python scripts/bench_selectit.py --data ../shared/data/cherry_alpaca_5_percent.json --rows 32
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from reflectune_hf.data import load_data
from reflectune_hf.scoring.selectit import SelectITScorer, model_scores, rating_prompts_for, sentence_scores, token_scores


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m-instruct", help="comma-separated model names")
    parser.add_argument("--data", default="sample", help="'sample' or a data file / directory / Hub id")
    parser.add_argument("--rows", type=int, default=16, help="first N rows of the data")
    parser.add_argument("--k", type=int, default=5, help="rating prompts per row")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (ours)")
    parser.add_argument("--formula", default="paper", choices=("paper", "reference"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None)
    return parser


def per_row_loop(scorer: SelectITScorer, rows: dict) -> dict:
    """The reference code's loop: one prompt at a time, full logits, softmax of the last one."""
    n = len(rows["instruction"])
    sentences = []
    for rater in scorer.raters():
        per_row = []
        for i in range(n):
            texts = rating_prompts_for(rows["instruction"][i], rows["input"][i], rows["output"][i],
                                       scorer.rating_prompts)
            probs = []
            for text in texts:
                encoded = rater.tokenizer(text, return_tensors="pt").to(rater.device)
                with torch.inference_mode():
                    logits = rater.model(**encoded).logits[:, -1, :]
                    p = torch.softmax(logits.float(), dim=-1)[0]
                probs.append([float(p[list(ids)].sum()) for ids in rater.rating_ids])
            per_row.append(float(sentence_scores(token_scores(np.array(probs), scorer.formula), scorer.alpha)))
        sentences.append(per_row)
    stacked = np.array(sentences).T
    result = {"selectit_sentence": stacked[:, 0]}
    if len(scorer.models) > 1:
        result["selectit_model"] = model_scores(stacked, [r.n_params for r in scorer.raters()])
    return result


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    models = tuple(m for m in args.models.split(",") if m)
    ds = load_data(args.data)
    ds = ds.select(range(min(args.rows, len(ds))))
    scorer = SelectITScorer(models=models, k=args.k, formula=args.formula, batch_size=args.batch_size,
                            device=args.device)
    raters = scorer.raters()  # load once, outside both timings
    for rater in raters:  # warm-up
        rater.ratings([rater.tokenizer("Warm up.")["input_ids"]])

    start = time.perf_counter()
    ours = ds.map(scorer, batched=True, batch_size=len(ds), load_from_cache_file=False, keep_in_memory=True)
    ours_s = time.perf_counter() - start

    rows = ds[:]
    start = time.perf_counter()
    loop = per_row_loop(scorer, rows)
    loop_s = time.perf_counter() - start

    line = {
        "benchmark": "selectit", "models": list(models), "rows": len(ds), "k": args.k,
        "forward_prompts": len(ds) * args.k * len(models), "batch_size": args.batch_size, "formula": args.formula,
        "device": str(raters[0].device), "threads": torch.get_num_threads(), "dtype": "float32",
        "ours_s": round(ours_s, 3), "loop_s": round(loop_s, 3), "speedup": round(loop_s / ours_s, 3),
        "all_ok": all(s == "ok" for s in ours["selectit_status"]),
    }
    for column, values in loop.items():
        line[f"max_abs_diff_{column.removeprefix('selectit_')}"] = float(
            np.nanmax(np.abs(np.array(ours[column]) - values)))
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main(make_parser().parse_args())
