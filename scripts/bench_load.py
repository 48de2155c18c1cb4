"""Benchmark: loading the embedded model in a new process, `load_causal_lm` against plain transformers.

Each run starts a fresh Python process and times it from start to exit, as a user's command
would feel it: interpreter start, imports of torch and transformers, tokenizer and weights
loaded from the converted cache directory, interpreter shutdown. The baseline loads the same
directory the plain transformers way (`AutoTokenizer.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` with SDPA, eval mode), which is what `load_causal_lm`
did before it paused the garbage collector during imports (it no longer freezes the import-time
objects: `gc.freeze` acts on the whole process, which a library must not do).
The two alternate, so both see the same machine. The conversion happens once, before timing.

A third kind, `command`, is the same load ended the way the `reflectune` command ends its process
(`cli.main.end_process`: the objects are frozen just before exit, so the interpreter's final
collection skips them); `ratio_command` is its median over the baseline's.

Prints ONE JSON line: runs, the medians and minima in seconds, `ratio` (ours / baseline
median: below 1 is faster), `ours_under_5s` (the foundation issue's bound on the median), and
the load average, because other processes on the machine skew the timings.

Usage:
    python scripts/bench_load.py
    python scripts/bench_load.py --runs 9 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

OURS = "from reflectune_hf.models import load_causal_lm\nload_causal_lm({model!r}, device='cpu')\n"
# The same load ended the way the `reflectune` command ends (`cli.main.end_process`).
COMMAND = OURS + "from reflectune_hf.cli.main import end_process\nend_process(0)\n"
BASELINE = (
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "AutoTokenizer.from_pretrained({path!r})\n"
    "AutoModelForCausalLM.from_pretrained({path!r}, attn_implementation='sdpa').eval()\n"
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="new processes of each kind (default 5)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="an embedded alias or a local model directory")
    return parser


def timed_process(code: str, env: dict) -> float:
    """Wall seconds of `python -c code`, from start to exit; raises with its stderr if it fails."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"the timed process failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return seconds


def main(args: argparse.Namespace) -> dict:
    from reflectune_hf.models import resolve_model

    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    path = resolve_model(args.model)  # converts once, outside the timings
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    ours_code, baseline_code = OURS.format(model=args.model), BASELINE.format(path=path)
    command_code = COMMAND.format(model=args.model)
    timed_process(ours_code, env)  # warm the file cache for both
    ours, baseline, command = [], [], []
    for _ in range(args.runs):
        ours.append(timed_process(ours_code, env))
        baseline.append(timed_process(baseline_code, env))
        command.append(timed_process(command_code, env))
    result = {
        "runs": args.runs,
        "model": args.model,
        "ours_s_median": round(statistics.median(ours), 3),
        "ours_s_min": round(min(ours), 3),
        "baseline_s_median": round(statistics.median(baseline), 3),
        "baseline_s_min": round(min(baseline), 3),
        "command_s_median": round(statistics.median(command), 3),
        "ratio": round(statistics.median(ours) / statistics.median(baseline), 3),
        "ratio_command": round(statistics.median(command) / statistics.median(baseline), 3),
        "ours_under_5s": statistics.median(ours) < 5.0,
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(make_parser().parse_args())
