"""Contextual ranking on a server that refuses logprobs: the student is asked for its answers only.

A stdlib `ThreadingHTTPServer` on 127.0.0.1 plays an OpenAI-compatible server that answers `400`
to any request asking for `logprobs` (as many hosted endpoints do), serves `n` choices otherwise,
and answers Tuna's ranking prompt with a ranking and a reference response.
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from datasets import Dataset
from loopback import JSONHandler

from reflectune_hf.oracles import OpenAIOracle
from reflectune_hf.tuna.stages import ContextualRank, SampleResponses

REPO = Path(__file__).resolve().parents[1]
JUDGE_ANSWER = "###Response 2:\nA reference answer.\n\nResponse 0: [9]\nResponse 1: [7]\n\nrank: [2, 0, 1]"


class _NoLogprobsHandler(JSONHandler):
    def do_GET(self) -> None:  # /v1/models
        self.send_json(200, {"object": "list", "data": [{"id": "student", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.requests.append(body)
        if body.get("logprobs") or body.get("top_logprobs"):
            self.send_json(400, {"error": {"message": "logprobs are not supported by this server",
                                           "type": "invalid_request_error"}})
            return
        prompt = body["messages"][-1]["content"]
        texts = [JUDGE_ANSWER] if "###Response 0:" in prompt else [f"answer {k}" for k in range(body.get("n") or 1)]
        choices = [{"index": k, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                    "logprobs": None} for k, text in enumerate(texts)]
        self.send_json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                             "choices": choices,
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


@pytest.fixture
def no_logprobs_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoLogprobsHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


ROWS = {"id": [0, 1], "instruction": ["Name a colour.", "Say hi."], "input": ["", ""]}


def test_student_answers_without_logprobs_then_the_judge_ranks(no_logprobs_server):
    oracle = OpenAIOracle("student", base_url=_url(no_logprobs_server), cache=False, max_retries=0)
    answers = SampleResponses(oracle, n=2, max_tokens=8, logprobs=False)(dict(ROWS))
    assert answers["sample_status"] == ["ok", "ok"] and answers["responses"] == [["answer 0", "answer 1"]] * 2
    assert "avg_logprobs" not in answers  # nothing to rank by: the column would be NaN only
    assert not any(r.get("logprobs") for r in no_logprobs_server.requests)
    ranked = ContextualRank(oracle)({**ROWS, "responses": answers["responses"]})
    assert ranked["ranking_status"] == ["ok", "ok"]
    assert ranked["ranked_responses"][0] == ["A reference answer.", "answer 0", "answer 1"]
    # Asked for logprobs (the probabilistic teacher), the same server fails the rows, each with its status.
    failed = SampleResponses(oracle, n=2, max_tokens=8)(dict(ROWS))
    assert failed["sample_status"] == ["oracle_error"] * 2 and "logprobs are not supported" in failed["sample_error"][0]


def test_tuna_job_contextual_stage_never_asks_the_student_for_logprobs(no_logprobs_server, tmp_path):
    from reflectune_hf.cli import tuna_job as script

    script_args, _, _ = script.make_parser().parse_args_and_config([
        "--config", str(REPO / "scripts" / "configs" / "tuna_contextual.yaml"), "--output_dir", str(tmp_path),
        "--oracle_model", "judge", "--oracle_base_url", _url(no_logprobs_server),
        "--student_base_url", _url(no_logprobs_server), "--num_responses", "2", "--use_cpu", "true",
        "--bf16", "false"])
    ranked = script.rank_dataset(Dataset.from_dict(ROWS), script_args, "student")
    assert ranked["sample_status"] == ["ok", "ok"]
    assert ranked["ranking_status"] == ["ok", "ok"] and ranked["rank"] == [[2, 0, 1]] * 2
    assert len(no_logprobs_server.requests) == 4 and not any(r.get("logprobs") for r in no_logprobs_server.requests)
