"""The Tuna job's oracle stages heal on a rerun as the reflection stages do (`map_stage`): a
failed sample (or ranking) request is not replayed from the datasets cache forever. A loopback
server fails some prompts on the first run and is healthy afterwards; the rerun, in a new
process, sends exactly the failed requests, and a third run sends nothing."""

from __future__ import annotations

from collections import Counter

from datasets import Dataset

from test_rerun import HealingServer, _python

RANK = """
import json, sys
from datasets import load_from_disk
from reflectune_hf.cli.tuna_job import TunaScriptArguments, rank_dataset
args = TunaScriptArguments(oracle_model="echo", oracle_base_url=sys.argv[2], oracle_max_retries=0, num_responses=2,
                           stage=sys.argv[3])
out = rank_dataset(load_from_disk(sys.argv[1]), args, student_model="echo")
print(json.dumps({c: list(out[c]) for c in ("sample_status", "ranking_status") if c in out.column_names}))
"""


def test_a_tuna_rerun_resends_only_the_failed_samples(tmp_path):
    rows = {"id": [0, 1, 2, 3], "instruction": ["Name a star.", "FAIL one", "Sort 3, 1.", "FAIL two"],
            "input": [""] * 4, "output": ["Sun", "x", "1, 3", "y"]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")  # Arrow-backed: the datasets cache is active
    with HealingServer() as server:
        first = _python(RANK, tmp_path / "ds", server.base_url, "probabilistic")
        assert first["sample_status"] == ["ok", "oracle_error", "ok", "oracle_error"]
        failed = [p for p in server.sent() if "FAIL" in p]
        assert len(server.sent()) == 4 and len(failed) == 2

        server.healthy = True
        before = len(server.chat_requests)
        second = _python(RANK, tmp_path / "ds", server.base_url, "probabilistic")
        assert sorted(server.sent(before)) == sorted(failed)  # exactly the failed prompts, once each
        assert second["sample_status"] == ["ok"] * 4 and "no_responses" not in second["ranking_status"]

        before = len(server.chat_requests)
        assert _python(RANK, tmp_path / "ds", server.base_url, "probabilistic") == second
        assert server.sent(before) == []


def test_a_contextual_rerun_resends_only_the_failed_rankings(tmp_path):
    rows = {"id": [0, 1, 2], "instruction": ["Name a star.", "FAIL one", "Sort 3, 1."], "input": [""] * 3,
            "output": ["Sun", "x", "1, 3"], "responses": [["Sun", "Moon"], ["a", "b"], ["1, 3", "3, 1"]]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "ds")
    with HealingServer() as server:
        first = _python(RANK, tmp_path / "ds", server.base_url, "contextual")
        assert Counter(first["ranking_status"])["oracle_error"] == 1 and first["ranking_status"][1] == "oracle_error"
        failed = [p for p in server.sent() if "FAIL" in p]
        server.healthy = True
        before = len(server.chat_requests)
        second = _python(RANK, tmp_path / "ds", server.base_url, "contextual")
        resent = server.sent(before)  # the failed request, then the judge's re-ask (this answer has no "rank:")
        assert resent[0] == failed[0] and all("FAIL one" in p for p in resent), resent
        assert "oracle_error" not in second["ranking_status"]
        before = len(server.chat_requests)
        assert _python(RANK, tmp_path / "ds", server.base_url, "contextual") == second
        assert server.sent(before) == []
