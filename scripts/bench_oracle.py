"""Benchmark: request rate of `OpenAIOracle` against the reference scripts' scheme, same server.

A loopback OpenAI-compatible server (a subprocess, so it does not share our interpreter) answers
every chat request after `latency ± jitter` seconds and fails a fraction `error_rate` of them
(half 429 with `Retry-After`, half 500), like a busy real service. In the same run it serves:

(a) ours: `OpenAIOracle` at `--concurrency` (32) requests in flight, SDK retries per request,
    every answer written to a (temporary) oracle cache;
(b) the reference scheme of the Reflection-Tuning scripts: batches of 10 sent with
    `asyncio.gather`, the whole batch resent after any failure, after a sleep that doubles
    (10 s at first in the reference; `--reference_wait`, 1 s by default, favours it).

Prints one JSON line: both request rates, the bound `concurrency / latency`, `ratio_vs_bound`
(target >= 0.7) and `ratio_vs_reference` (target >= 5).

    python scripts/bench_oracle.py --latency 0.2 --jitter 0.05 --error_rate 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai  # noqa: F401 - imported before any timing: module import is not request throughput

from reflectune_hf.oracles import ChatRequest, OpenAIOracle


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per answer (mean)")
    parser.add_argument("--jitter", type=float, default=0.05, help="uniform ± seconds around the latency")
    parser.add_argument("--error_rate", type=float, default=0.02, help="share of attempts failing with 429/500")
    parser.add_argument("--retry_after", default="1", help="Retry-After of the server's 429s (seconds)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1600, help="requests sent by ours")
    parser.add_argument("--reference_requests", type=int, default=300, help="requests sent by the reference scheme")
    parser.add_argument("--reference_batch", type=int, default=10)
    parser.add_argument("--reference_wait", type=float, default=1.0, help="first sleep after a failed batch")
    return parser


def start_server(args) -> tuple[subprocess.Popen, str]:
    server = Path(__file__).resolve().parents[1] / "tests" / "loopback.py"  # a test server, not part of the package
    cmd = [sys.executable, str(server), "--latency", str(args.latency),
           "--jitter", str(args.jitter), "--error_rate", str(args.error_rate), "--retry_after", args.retry_after]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    return proc, json.loads(proc.stdout.readline())["base_url"]


def messages(tag: str, n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{tag} request {i}"}] for i in range(n)]


def run_ours(args, base_url: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        oracle = OpenAIOracle("bench", base_url=base_url, max_concurrency=args.concurrency, timeout=30,
                              cache=os.path.join(tmp, "oracle.sqlite"), progress=False)
        requests = [ChatRequest(m, max_tokens=16) for m in messages("ours", args.requests)]
        start = time.perf_counter()
        results = oracle.complete(requests)
        elapsed = time.perf_counter() - start
    return args.requests / elapsed, sum(not r.ok for r in results)


async def _reference_batch(base_url: str, batch: list[list[dict]]) -> list:
    from openai import AsyncOpenAI

    # The reference used the pre-1.0 client: no retries of its own, one event loop per batch.
    async with AsyncOpenAI(api_key="not-needed", base_url=base_url, max_retries=0, timeout=30) as client:
        calls = [client.chat.completions.create(model="bench", messages=m, max_tokens=16, temperature=0.0, top_p=1.0)
                 for m in batch]
        return await asyncio.gather(*calls)


def run_reference(args, base_url: str) -> tuple[float, int]:
    todo = messages("reference", args.reference_requests)
    answers, resent, wait, i = [], 0, args.reference_wait, 0
    start = time.perf_counter()
    while i < len(todo):
        batch = todo[i:i + args.reference_batch]
        try:
            answers += asyncio.run(_reference_batch(base_url, batch))
            i, wait = i + len(batch), args.reference_wait
        except Exception:  # noqa: BLE001 - the reference's bare except: resend the whole batch
            resent += len(batch)
            time.sleep(wait)
            wait *= 2
    return len(answers) / (time.perf_counter() - start), resent


def main(args) -> dict:
    proc, base_url = start_server(args)
    try:
        ours, ours_failed = run_ours(args, base_url)
        reference, reference_resent = run_reference(args, base_url)
    finally:
        proc.terminate()
        proc.wait()
    bound = args.concurrency / args.latency
    report = {
        "bench": "oracle", "latency_s": args.latency, "jitter_s": args.jitter, "error_rate": args.error_rate,
        "concurrency": args.concurrency, "requests": args.requests, "reference_requests": args.reference_requests,
        "ours_rps": round(ours, 2), "reference_rps": round(reference, 2), "bound_rps": round(bound, 2),
        "ratio_vs_bound": round(ours / bound, 3), "ratio_vs_reference": round(ours / reference, 2),
        "ours_failed_rows": ours_failed, "reference_resent_requests": reference_resent,
    }
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(make_parser().parse_args())
