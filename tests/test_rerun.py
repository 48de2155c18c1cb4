"""Failed rows are never frozen by the datasets cache (issue #16.2): `map_stage` and `reflectune
reflect` rerun in a new process against a loopback OpenAI-compatible server that fails some
prompts on the first run and is healthy afterwards; a rerun sends exactly the requests that
failed, heals every later step, and a rerun of a clean run sends nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk

from loopback import LoopbackServer

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ANSWER = ("1. It can be better.\n2. [New Instruction] Explain it well. [End]\n3. [New Answer] A better answer. [End]\n"
          "[Better Answer] A better answer. [End]")


class HealingServer(LoopbackServer):
    """Answers every stage in format; while `healthy` is False, prompts containing "FAIL" get a
    429 (with a tiny `Retry-After`, so the client's retries are quick and all fail)."""

    def __init__(self):
        self.healthy = False
        super().__init__(faults=lambda prompt, attempt: "ok" if self.healthy or "FAIL" not in prompt else "429",
                         retry_after="0.01")

    def completion(self, body: dict, prompt: str) -> dict:
        reply = super().completion(body, prompt)
        reply["choices"][0]["message"]["content"] = ANSWER
        return reply

    def sent(self, since: int = 0) -> list[str]:
        return [e["prompt"] for e in self.chat_requests[since:]]


def _python(script: str, *args) -> dict:
    """Run `script` in a new process with this checkout on the path; its last line is JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


MAP_STAGE = """
import json, sys
from datasets import load_from_disk
from reflectune_hf import OpenAIOracle, ReflectResponse, extract_response_reflection, map_stage
stage = ReflectResponse(OpenAIOracle("echo", base_url=sys.argv[2], max_retries=0), format_retries=0)
out = map_stage(load_from_disk(sys.argv[1]), stage).map(extract_response_reflection, batched=True)
print(json.dumps({"status": list(out["reflection_status"]), "output": list(out["output"])}))
"""


def test_map_stage_rerun_in_a_new_process_sends_exactly_the_failed_prompts(tmp_path):
    rows = {"instruction": ["Name a star.", "FAIL one", "Sort 3, 1.", "FAIL two", "Add 2 and 2."],
            "output": ["Sun", "x", "1, 3", "y", "4"]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")  # Arrow-backed: the datasets cache is active
    with HealingServer() as server:
        first = _python(MAP_STAGE, tmp_path / "ds", server.base_url)
        assert first["status"] == ["ok", "oracle_error", "ok", "oracle_error", "ok"]
        assert first["output"][1] == "x" and first["output"][0] == "A better answer."
        failed = [p for p in server.sent() if "FAIL" in p]
        assert len(server.sent()) == 5 and len(failed) == 2

        server.healthy = True
        before = len(server.chat_requests)
        second = _python(MAP_STAGE, tmp_path / "ds", server.base_url)
        assert sorted(server.sent(before)) == sorted(failed)  # exactly the failed prompts, once each
        assert second["status"] == ["ok"] * 5  # the extraction after it is healed too
        assert second["output"] == ["A better answer."] * 5

        before = len(server.chat_requests)
        third = _python(MAP_STAGE, tmp_path / "ds", server.base_url)
        assert server.sent(before) == [] and third == second


def test_map_stage_follows_a_chain_of_partial_heals(tmp_path):
    # Run 2 heals one of two failed rows; run 3 (new process) re-sends only the other one, and
    # run 4 replays the healed chain from the cache without a request.
    Dataset.from_dict({"instruction": ["FAIL-A one", "FAIL-B two", "ok"], "output": ["x", "y", "z"]}).save_to_disk(
        tmp_path / "ds")
    with HealingServer() as server:
        assert _python(MAP_STAGE, tmp_path / "ds", server.base_url)["status"] == ["oracle_error"] * 2 + ["ok"]
        server.faults = lambda prompt, attempt: "429" if "FAIL-B" in prompt else "ok"
        before = len(server.chat_requests)
        assert _python(MAP_STAGE, tmp_path / "ds", server.base_url)["status"] == ["ok", "oracle_error", "ok"]
        assert len(server.sent(before)) == 2  # both failed prompts tried, FAIL-B failed again
        server.faults = None
        before = len(server.chat_requests)
        assert _python(MAP_STAGE, tmp_path / "ds", server.base_url)["status"] == ["ok"] * 3
        assert [p for p in server.sent(before)] == [p for p in server.sent() if "FAIL-B" in p][:1]
        before = len(server.chat_requests)
        assert _python(MAP_STAGE, tmp_path / "ds", server.base_url)["status"] == ["ok"] * 3
        assert server.sent(before) == []


REASK_STAGE = MAP_STAGE.replace("format_retries=0", "format_retries=1")


class FailingReaskServer(HealingServer):
    """The first answer to a "REASK" prompt does not parse; while not `healthy`, its re-ask gets
    a 429 (every other prompt is answered in format)."""

    def __init__(self):
        super().__init__()
        self.faults = lambda prompt, attempt: "429" if "REASK" in prompt and attempt > 1 and not self.healthy else "ok"

    def completion(self, body: dict, prompt: str) -> dict:
        reply = super().completion(body, prompt)
        if "REASK" in prompt and body.get("seed") is None:  # the first request (re-asks carry a seed)
            reply["choices"][0]["message"]["content"] = "I think it is fine."
        return reply


def test_a_failed_re_ask_is_an_oracle_error_that_a_rerun_heals(tmp_path):
    """The re-ask's failure was dropped: the row was stored as `failed` with no error, and every
    rerun replayed it from the datasets cache without a request."""
    Dataset.from_dict({"instruction": ["Name a star.", "REASK me"], "output": ["Sun", "x"]}).save_to_disk(
        tmp_path / "ds")
    with FailingReaskServer() as server:
        first = _python(REASK_STAGE, tmp_path / "ds", server.base_url)
        assert first["status"] == ["ok", "oracle_error"] and first["output"][1] == "x"
        server.healthy = True
        before = len(server.chat_requests)
        second = _python(REASK_STAGE, tmp_path / "ds", server.base_url)
        assert second["status"] == ["ok", "ok"] and second["output"][1] == "A better answer."
        assert [p for p in server.sent(before) if "REASK" not in p] == []  # only the failed row asked again


def test_in_memory_iterable_and_empty_datasets(tmp_path):
    from reflectune_hf import ReflectResponse, map_stage
    from scripted_oracle import demo_oracle

    ds = Dataset.from_dict({"instruction": ["a", "b"], "output": ["c", "d"]})
    assert list(map_stage(ds, ReflectResponse(demo_oracle()))["reflection_error"]) == ["", ""]
    streamed = map_stage(ds.to_iterable_dataset(), ReflectResponse(demo_oracle()), desc="Reflecting", batch_size=1)
    assert [row["reflection_attempts"] for row in streamed] == [1, 1]
    # Issue #16.9a: 0 rows give the stage's output columns (map alone returns none).
    for empty in (ds.select([]), load_from_disk(_saved(ds, tmp_path)).select([])):
        out = map_stage(empty, ReflectResponse(demo_oracle()))
        assert len(out) == 0 and out.column_names == ["instruction", "output", "reflection_raw", "reflection_error",
                                                       "reflection_attempts", "reflection_finish_reason"]
        assert out.features["reflection_attempts"].dtype == "int64"
        # remove_columns and the ids of with_indices apply to 0 rows too (an empty split kept `output`).
        out = map_stage(empty, ReflectResponse(demo_oracle()), remove_columns=["output"], with_indices=True)
        assert out.column_names == map_stage(ds, ReflectResponse(demo_oracle()), remove_columns=["output"],
                                             with_indices=True).column_names


def _saved(ds, tmp_path) -> str:
    ds.save_to_disk(tmp_path / "saved")
    return str(tmp_path / "saved")


@pytest.mark.slow
def test_cli_reflect_twice_heals_the_failed_rows(tmp_path):
    from test_cli import reflectune

    data = tmp_path / "pairs.jsonl"
    rows = [("Name a star.", "Sun"), ("FAIL tell a joke", "No."), ("Add 2 and 2.", "4"), ("FAIL count", "3")]
    data.write_text("".join(json.dumps({"instruction": i, "input": "", "output": o}) + "\n" for i, o in rows))
    with HealingServer() as server:
        args = ["reflect", "--data", data, "--oracle_model", "echo", "--base_url", server.base_url,
                "--format_retries", 0, "--output_dir", tmp_path / "out"]
        first = reflectune(*args, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        variants = load_from_disk(str(tmp_path / "out" / "arrow"))
        assert Counter(variants["reflect_response"]["reflection_status"]) == {"ok": 2, "oracle_error": 2}
        failed = {p for p in server.sent() if "FAIL" in p}

        server.healthy = True
        before = len(server.chat_requests)
        second = reflectune(*args, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        sent = server.sent(before)
        assert set(sent) == failed and len(sent) == len(failed)  # each failed prompt once, nothing else
        variants = load_from_disk(str(tmp_path / "out" / "arrow"))
        for split in ("reflect_instruction", "reflect_response", "reflect_both"):
            assert set(variants[split]["reflection_status"]) == {"ok"}, split
        assert set(variants["reflect_both"]["output"]) == {"A better answer."}

        before = len(server.chat_requests)
        third = reflectune(*args, timeout=300)
        assert third.returncode == 0 and server.sent(before) == []


@pytest.mark.slow
def test_rerun_of_a_clean_run_loads_no_local_model(tmp_path, smollm2_dir):
    from reflectune_hf import ReflectResponse, TransformersOracle, map_stage

    Dataset.from_dict({"instruction": ["Name a bird.", "Name a star."], "output": ["Cat.", "Moon."]}).save_to_disk(
        tmp_path / "ds")
    first = TransformersOracle("smollm2-135m-instruct", max_new_tokens=8)
    out = map_stage(load_from_disk(str(tmp_path / "ds")), ReflectResponse(first, max_tokens=8, format_retries=0))
    assert list(out["reflection_error"]) == ["", ""] and getattr(first, "_model", None) is not None
    again = TransformersOracle("smollm2-135m-instruct", max_new_tokens=8)
    rerun = map_stage(load_from_disk(str(tmp_path / "ds")), ReflectResponse(again, max_tokens=8, format_retries=0))
    assert list(rerun["reflection_raw"]) == list(out["reflection_raw"])
    assert getattr(again, "_model", None) is None  # served by the datasets cache: nothing loaded, nothing sent


class _SwitchOracle:
    """Fails prompts with "FAIL" while the class's `healthy` is False (not in the pickled state,
    so not in the datasets fingerprint: a rerun after the outage has the same one); counts `sent`."""

    healthy, sent = False, 0

    def __getstate__(self) -> dict:
        return {}

    def complete(self, requests):
        from reflectune_hf.oracles.base import ChatResult

        type(self).sent += len(requests)
        return [ChatResult.failure("429") if "FAIL" in r.message_dicts[-1]["content"] and not self.healthy
                else ChatResult(texts=["[Better Answer] Fine. [End]"], finish_reasons=["stop"]) for r in requests]


@pytest.mark.parametrize("on_disk", [True, False])
def test_map_stage_heals_a_replayed_cache_file_name(tmp_path, monkeypatch, on_disk):
    """`map` replays a named `cache_file_name` whatever the fingerprint (in-memory datasets too):
    map_stage looked for replays only next to the dataset's own files and froze the failures."""
    from reflectune_hf import ReflectResponse, map_stage

    ds = Dataset.from_dict({"instruction": ["Name a star.", "FAIL one"], "output": ["Sun", "x"]})
    if on_disk:
        ds = load_from_disk(_saved(ds, tmp_path))
    named = str(tmp_path / "named" / "reflected.arrow")
    os.makedirs(os.path.dirname(named))
    monkeypatch.setattr(_SwitchOracle, "healthy", False)
    run = lambda: map_stage(ds, ReflectResponse(_SwitchOracle(), format_retries=0), cache_file_name=named)  # noqa
    assert [bool(e) for e in run()["reflection_error"]] == [False, True]
    monkeypatch.setattr(_SwitchOracle, "healthy", True)
    assert list(run()["reflection_error"]) == ["", ""]  # healed, under a name of its own
    sent = _SwitchOracle.sent
    assert list(run()["reflection_error"]) == ["", ""] and _SwitchOracle.sent == sent  # replayed, clean
    assert os.path.getsize(named) > 0


def test_map_stage_heals_under_a_given_new_fingerprint(tmp_path, monkeypatch):
    """`new_fingerprint=...` made map_stage a plain `map`: its cached failures were replayed forever."""
    from reflectune_hf import ReflectResponse, map_stage

    ds = load_from_disk(_saved(Dataset.from_dict({"instruction": ["Name a star.", "FAIL one"], "output": ["a", "b"]}),
                               tmp_path))
    monkeypatch.setattr(_SwitchOracle, "healthy", False)
    run = lambda: map_stage(ds, ReflectResponse(_SwitchOracle(), format_retries=0), new_fingerprint="mine0")  # noqa
    assert [bool(e) for e in run()["reflection_error"]] == [False, True]
    monkeypatch.setattr(_SwitchOracle, "healthy", True)
    assert list(run()["reflection_error"]) == ["", ""]


def test_map_stage_heals_every_split_of_a_dataset_dict(tmp_path, monkeypatch):
    """A `DatasetDict` (what `load_dataset` returns) went to its own plain `map`: its failed rows
    were replayed from the datasets cache forever."""
    from datasets import DatasetDict

    from reflectune_hf import ReflectResponse, map_stage

    one = Dataset.from_dict({"instruction": ["Name a star.", "FAIL one"], "output": ["a", "b"]})
    DatasetDict({"train": one, "test": one}).save_to_disk(tmp_path / "dd")
    monkeypatch.setattr(_SwitchOracle, "healthy", False)
    stage = ReflectResponse(_SwitchOracle(), format_retries=0)
    run = lambda: map_stage(load_from_disk(str(tmp_path / "dd")), stage)  # noqa: E731
    assert [bool(e) for e in run()["test"]["reflection_error"]] == [False, True]
    monkeypatch.setattr(_SwitchOracle, "healthy", True)
    assert {name: list(split["reflection_error"]) for name, split in run().items()} == {
        "train": ["", ""], "test": ["", ""]}


def test_map_stage_with_another_batch_size_replays_the_cache(tmp_path):
    """datasets keys a map by its `batch_size`: `reflectune reflect --reflect_batch_size 8` after a
    run with 16 asked the oracle again (and `--score_batch_size` scored every row again), though
    the rows do not depend on it. `drop_last_batch` decides rows by the batch size: kept there."""
    from scripted_oracle import demo_oracle

    from reflectune_hf import ReflectResponse, map_stage

    Dataset.from_dict({"instruction": [f"Task {i}." for i in range(5)], "output": ["x"] * 5}).save_to_disk(
        tmp_path / "ds")
    data = load_from_disk(tmp_path / "ds")
    oracle = demo_oracle()
    first = map_stage(data, ReflectResponse(oracle), batch_size=2)
    assert oracle.calls == 3
    again = map_stage(data, ReflectResponse(oracle), batch_size=4, desc="again", writer_batch_size=7)
    assert oracle.calls == 3 and again._fingerprint == first._fingerprint
    assert again["reflection_raw"] == first["reflection_raw"]
    dropped = map_stage(data, ReflectResponse(oracle), batch_size=2, drop_last_batch=True)
    assert oracle.calls == 5 and len(dropped) == 4
