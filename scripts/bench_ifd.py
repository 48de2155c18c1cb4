"""Benchmark: `IFDScorer` against the per-row reference loop, on the same rows and model.

The baseline is the method's reference algorithm (`reflectune_hf.scoring.reference`: batch size
1, four full forward passes per row through the whole model); both run the same model in `--dtype`
(`--baseline-dtype float32` compares a low-precision scorer with the published script's float32). Prints ONE JSON line: rows, both seconds per row, `speedup` (baseline / scorer) and
`max_rel_diff` (the largest relative difference of the four losses over all rows), plus the
load average, because other processes on the machine skew the timings. Memory: the process's
resident set after the scorer's first and last map-sized batch (`rss_mb_first_batch`,
`rss_mb_last_batch`) and their ratio `rss_growth` (~1.0: nothing accumulates across batches;
use several batches, e.g. `--rows 256 --batch-size 16`).

With `--base_url` it compares instead the local engine with the same student served by vLLM or
llama.cpp (`IFDScorer(base_url=...)`, answer cache off so every request is sent) on the same
rows: one JSON line with `local_rows_per_s`, `server_rows_per_s`, their ratio, the largest
absolute difference of each loss and the Spearman correlation of the two IFD rankings
(`max_abs_loss_diff`, `spearman_ifd`, rows both score `ok`), `status_mismatches` (rows whose
statuses differ), the server's statuses and `requests_sent` (llama-cpp-python: the echoes, the
probe and the forced-token requests, see `scoring.served_llamacpp`, with `echo_top_k`).
`--parity` takes the rows of issue #20's parity check (real Alpaca rows of
60-140 characters, as tests/test_served_student.py picks them; `--rows 16` for the issue's figure).

Usage:
    python scripts/bench_ifd.py --dtype float32
    python scripts/bench_ifd.py --dtype bfloat16 --rows 64 --device cpu
    python scripts/bench_ifd.py --base_url http://127.0.0.1:8000/v1 --server_model my-student --rows 256
    python scripts/bench_ifd.py --base_url http://127.0.0.1:8080/v1 --parity --rows 16 --max_concurrency 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_ROWS = ROOT.parent / "shared" / "data" / "cherry_alpaca_5_percent.json"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", help="scorer dtype: float32, bfloat16, float16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: CUDA when present)")
    parser.add_argument("--baseline-dtype", default=None, help="dtype of the per-row loop (default: --dtype)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--data", default=None, help=f"JSON/JSONL rows (default: {SHARED_ROWS} if present, else the bundled sample)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--template", default="vicuna")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="default: the scorer's (16384 GPU, 1024 CPU)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per scorer call (a map batch)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for both (default: torch's)")
    parser.add_argument("--base_url", default=None, help="compare with the student served at this URL (ends in /v1)")
    parser.add_argument("--server_model", default=None, help="the student's name on the server (default: --model)")
    parser.add_argument("--student_backend", default="auto", help="auto, vllm, llamacpp or echo")
    parser.add_argument("--max_concurrency", type=int, default=16, help="served requests in flight")
    parser.add_argument("--skip_local", action="store_true", help="time the server only (no local engine run)")
    parser.add_argument("--parity", action="store_true",
                        help="issue #20's parity rows: those of 60-140 characters (instruction + input + output)")
    return parser


def main_served(args: argparse.Namespace) -> dict:
    """Local engine vs served student on the same rows: rows/s of each, loss differences."""
    from reflectune_hf.scoring.ifd import LOSS_NAMES, IFDScorer

    rows, source = load_rows(args.data, args.rows, (60, 140) if args.parity else None)
    cols = [[r[k] for r in rows] for k in ("instruction", "input", "output")]
    served = IFDScorer(args.model, args.template, args.max_length, base_url=args.base_url,
                       server_model=args.server_model, student_backend=args.student_backend,
                       max_concurrency=args.max_concurrency, cache=False)
    start = time.perf_counter()
    remote = served.score(*cols)
    server_s = time.perf_counter() - start
    result = {"rows": len(rows), "data": source, "backend": served.server.mode(),
              "max_concurrency": served.server.concurrency(), "server_rows_per_s": round(len(rows) / server_s, 3),
              "server_ok": sum(s == "ok" for s in remote["score_status"]),
              "server_statuses": dict(Counter(remote["score_status"])), "requests_sent": served.server.usage["sent"]}
    if result["backend"] == "llamacpp":
        from reflectune_hf.scoring.served_llamacpp import ECHO_TOP_K

        result["echo_top_k"] = ECHO_TOP_K
    if not args.skip_local:
        local = IFDScorer(args.model, args.template, args.max_length, args.dtype, args.device, args.max_tokens_per_batch)
        local.load()
        start = time.perf_counter()
        mine = local.score(*cols)
        local_s = time.perf_counter() - start
        both = [i for i in range(len(rows)) if remote["score_status"][i] == mine["score_status"][i] == "ok"]
        result.update({
            "local_rows_per_s": round(len(rows) / local_s, 3), "server_vs_local": round(local_s / server_s, 3),
            "max_abs_loss_diff": {n: max((abs(remote[f"loss_{n}"][i] - mine[f"loss_{n}"][i]) for i in both),
                                         default=None) for n in LOSS_NAMES},
            "spearman_ifd": spearman([remote["ifd"][i] for i in both], [mine["ifd"][i] for i in both]),
            "status_mismatches": sum(a != b for a, b in zip(remote["score_status"], mine["score_status"])),
        })
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return result


def spearman(a: list, b: list):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation) if len(a) > 2 else None


def row_spans(tokenizer, template: str, instruction: str, input: str, output: str) -> list:
    """The four (ids, start) of a row (instruction alone, output alone, instruction after the
    reverse prompt, output after the prompt), built from the public prompt API the way the
    scorer builds them (as tests/test_served_student.py does)."""
    from reflectune_hf.prompts import get_scoring_template, reverse_prompt

    tpl = get_scoring_template(template)
    prompt = tpl.format(instruction, input)
    reverse = tpl.no_input.format(instruction=reverse_prompt(output))
    whole_reverse, whole = reverse + instruction + input, prompt + output
    ids = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    return [(ids(instruction + input), 1), (ids(output), 1),
            (ids(whole_reverse), len(ids(whole_reverse[: whole_reverse.rfind(instruction)]))),
            (ids(whole), len(ids(whole[: whole.rfind(output)])))]


def load_rows(path, n: int, chars: tuple = None) -> tuple[list[dict], str]:
    """`n` rows of `path` (default: the shared Alpaca rows, else the bundled sample); with
    `chars=(lo, hi)` only rows whose instruction + input + output hold lo..hi characters."""
    from reflectune_hf.data import read_records, sample_path

    if path is None:
        path = SHARED_ROWS if SHARED_ROWS.is_file() else sample_path()
    rows = [{k: row.get(k) or "" for k in ("instruction", "input", "output")} for row in read_records(path)]
    if chars:
        rows = [r for r in rows if chars[0] <= len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= chars[1]]
    return rows[:n], str(path)


def resident_mb() -> float:
    """This process's resident set size now, in MiB (Linux `/proc`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main(args: argparse.Namespace) -> dict:
    import torch

    from reflectune_hf.models import load_causal_lm
    from reflectune_hf.scoring.ifd import LOSS_NAMES, IFDScorer
    from reflectune_hf.scoring.reference import reference_scores

    if args.threads:
        torch.set_num_threads(args.threads)
    rows, source = load_rows(args.data, args.rows)
    baseline_dtype = args.baseline_dtype or args.dtype
    model, tokenizer = load_causal_lm(args.model, dtype=baseline_dtype, device=args.device)
    scorer = IFDScorer(args.model, args.template, args.max_length, args.dtype, args.device, args.max_tokens_per_batch)
    scorer.load()
    sync = torch.cuda.synchronize if str(model.device).startswith("cuda") else (lambda: None)

    reference_scores(model, tokenizer, rows[:1], args.template, args.max_length)  # warm-up both
    scorer.score(*([r[k] for r in rows[:1]] for k in ("instruction", "input", "output")))
    sync()
    start = time.perf_counter()
    baseline = reference_scores(model, tokenizer, rows, args.template, args.max_length)
    sync()
    baseline_s = time.perf_counter() - start

    start = time.perf_counter()
    fast, rss = [], []
    for lo in range(0, len(rows), args.batch_size):
        chunk = rows[lo: lo + args.batch_size]
        cols = scorer.score(*([r[k] for r in chunk] for k in ("instruction", "input", "output")))
        fast.extend(zip(*(cols[f"loss_{n}"] for n in LOSS_NAMES)))
        rss.append(resident_mb())
    sync()
    fast_s = time.perf_counter() - start

    diffs = [abs(a - b) / abs(b) for ref, got in zip(baseline, fast) for a, b in zip(got, ref) if math.isfinite(b)]
    mismatched_nan = sum(math.isfinite(a) != math.isfinite(b) for ref, got in zip(baseline, fast) for a, b in zip(got, ref))
    result = {
        "rows": len(rows), "data": source, "device": str(model.device), "dtype": args.dtype,
        "baseline_dtype": baseline_dtype, "baseline_s_per_row": round(baseline_s / len(rows), 4),
        "scorer_s_per_row": round(fast_s / len(rows), 4), "speedup": round(baseline_s / fast_s, 3),
        "max_rel_diff": max(diffs) if diffs else None, "nan_mismatches": mismatched_nan,
        "rss_mb_first_batch": rss[0], "rss_mb_last_batch": rss[-1], "rss_growth": round(rss[-1] / rss[0], 3),
        "threads": torch.get_num_threads(), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    arguments = make_parser().parse_args()
    sys.exit(0 if (main_served if arguments.base_url else main)(arguments) else 1)
