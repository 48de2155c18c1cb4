"""Fault injection: `ReflectResponse(OpenAIOracle(...))` over 200 real Alpaca rows through
`Dataset.map`, against a loopback server that fails 30% of all attempts (seeded, per attempt):
10% HTTP 429 with `Retry-After: 0`, 10% HTTP 500, 5% a hang just past the client timeout, 5% an
HTTP 200 with a malformed body (half truncated JSON, half JSON without `choices`).

With `max_retries=6`, at least 199/200 rows come back without error, none is lost or duplicated,
no prompt is delivered (paid) twice, and a rerun sends no prompt whose answer was delivered.
`pytest -s` prints the figures.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

from conftest import SHARED

from reflectune_hf.data import records_to_dataset, read_records, sample_path
from reflectune_hf.reflection.extract import extract_response_reflection
from reflectune_hf.oracles import ChatRequest, OpenAIOracle
from loopback import LoopbackServer
from reflectune_hf.reflection.stages import ReflectResponse

ROWS = 200
TIMEOUT = 2.0  # the client's timeout per HTTP attempt
HANG = TIMEOUT + 0.5  # a hang lasts just past it
SEED = 1234
MIX = (("429", 0.10), ("500", 0.10), ("slow", 0.05), ("malformed", 0.025), ("no_choices", 0.025))


def seeded_fault(prompt: str, attempt: int) -> str:
    """The action for one attempt: a function of (seed, prompt, attempt) only, so the faults do not
    depend on the order in which concurrent requests reach the server."""
    digest = hashlib.sha256(f"{SEED}|{prompt}|{attempt}".encode()).digest()
    draw = int.from_bytes(digest[:8], "big") / 2 ** 64
    for action, share in MIX:
        if draw < share:
            return action
        draw -= share
    return "ok"


class ReflectingServer(LoopbackServer):
    """Answers in the response-reflection format, so every delivered answer parses."""

    def completion(self, body: dict, prompt: str) -> dict:
        data = super().completion(body, prompt)
        tag = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        for choice in data["choices"]:
            choice["message"]["content"] = f"1. Fine.\n2. [Better Answer] A better answer ({tag}). [End]"
        return data


def alpaca_rows():
    shared = SHARED / "data" / "cherry_alpaca_5_percent.json"
    records = read_records(shared)[:ROWS] if shared.is_file() else read_records(sample_path())  # 40 without ../shared
    return records_to_dataset(records)


def run(ds, server, **oracle_kwargs):
    oracle = OpenAIOracle("echo", base_url=server.base_url, timeout=TIMEOUT, max_retries=6, progress=False,
                          **oracle_kwargs)
    out = ds.map(ReflectResponse(oracle), batched=True, batch_size=100, load_from_cache_file=False)
    return out.map(extract_response_reflection, batched=True, load_from_cache_file=False), oracle


def test_faults_are_retried_and_no_answer_is_paid_twice():
    ds = alpaca_rows()
    n = len(ds)
    with ReflectingServer(faults=seeded_fault, retry_after="0", slow_seconds=HANG) as server:
        started = time.monotonic()
        out, oracle = run(ds, server)
        seconds = time.monotonic() - started
        first = server.chat_requests
        faults = Counter(e["action"] for e in first)
        delivered = Counter(server.delivered)
        errors = [e for e in out["reflection_error"] if e]
        print(f"\n[faults] rows ok {n - len(errors)}/{n}, attempts {len(first)}, "
              f"faults {dict(sorted((k, v) for k, v in faults.items() if k != 'ok'))}, "
              f"seconds {seconds:.1f}, oracle usage {oracle.usage}")
        if errors:
            print(f"[faults] errors: {errors}")

        assert len(out) == n and sorted(out["id"]) == sorted(ds["id"]), "no row lost, none duplicated"
        assert len(set(out["id"])) == n
        assert n - len(errors) >= n - 1, errors
        assert all(s == "ok" for s, e in zip(out["reflection_status"], out["reflection_error"]) if not e)
        assert faults["malformed"] + faults["no_choices"] > 0 and faults["slow"] > 0  # the mix really ran
        assert max(delivered.values()) == 1, "an answer was delivered (paid) twice"

        # A rerun (same oracle cache) sends only what failed; no delivered answer is asked again.
        before = len(server.chat_requests)
        again, _ = run(ds, server)
        resent = {e["prompt"] for e in server.chat_requests[before:]}
        print(f"[faults] rerun: {len(server.chat_requests) - before} requests for {len(resent)} prompts")
        assert not resent & set(delivered)
        assert len(resent) <= len(errors)
        assert again["reflection_raw"][:10] == out["reflection_raw"][:10] or errors
    assert max(Counter(server.delivered).values()) == 1


def test_a_malformed_200_is_retried_within_the_budget_and_then_fails():
    """Truncated JSON, JSON without `choices` and a non-object JSON body count as transient, like
    a 5xx: retried with the SDK's backoff within `max_retries`, an error only once it is spent."""
    script = {"trunc": ["malformed", "ok"], "nochoices": ["no_choices", "no_choices", "ok"],
              "mixed": ["500", "malformed", "429", "ok"], "always": ["malformed"] * 10}
    with LoopbackServer(faults=script, retry_after="0") as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, timeout=5, max_retries=3, progress=False)
        results = oracle.complete([ChatRequest([{"role": "user", "content": p}]) for p in script])
        by_prompt = dict(zip(script, results))
        for prompt in ("trunc", "nochoices", "mixed"):
            assert by_prompt[prompt].ok and by_prompt[prompt].text == f"echo: {prompt}", by_prompt[prompt]
        assert not by_prompt["always"].ok and "malformed" in by_prompt["always"].error
        attempts = Counter(e["prompt"] for e in server.chat_requests)
        assert attempts == {"trunc": 2, "nochoices": 3, "mixed": 4, "always": 4}  # 1 + max_retries at most
