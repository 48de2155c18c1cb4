"""OpenAIBatchOracle against a local server implementing the files and batches endpoints.

There is no real Batch service here: `BatchServer` follows OpenAI's documented wire format
(JSONL input with custom_id, output and error files, batch status and request counts).
"""

from __future__ import annotations

import json
import threading
import time
from email.parser import BytesParser
from email.policy import HTTP

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIBatchOracle, OpenAIOracle, OracleConfigurationError
from reflectune_hf.oracles.batch import split_lines
from reflectune_hf.oracles.loopback import LoopbackServer


class BatchServer(LoopbackServer):
    """Files and batches endpoints; a batch completes on its first poll unless `hold` is set."""

    def __init__(self, fail_prompts=(), hold=False, **kwargs):
        super().__init__(**kwargs)
        self.fail_prompts = set(fail_prompts)
        self.hold = threading.Event()
        if hold:
            self.hold.set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}

    def extra_post(self, handler, raw):
        path = handler.path.rstrip("/")
        self.record(path, None, "post")
        if not handler._authorized():
            return
        if path.endswith("/files"):
            message = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            part = next(p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file")
            file_id = self._store(part.get_payload(decode=True))
            return handler._send(200, {"id": file_id, "object": "file", "bytes": len(self.files[file_id]),
                                       "created_at": int(time.time()), "filename": "input.jsonl", "purpose": "batch",
                                       "status": "processed"})
        if path.endswith("/batches"):
            body = json.loads(raw)
            lines = self.files[body["input_file_id"]].decode().splitlines()
            batch_id = f"batch_{len(self.batches)}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"], "status": "validating", "created_at": int(time.time()),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
            return handler._send(200, self.batches[batch_id])
        handler._send(404, {"error": {"message": "no route"}})

    def extra_get(self, handler):
        path = handler.path.rstrip("/")
        if "/files/" in path and path.endswith("/content"):
            return handler._send(200, self.files[path.split("/")[-2]])
        if "/batches/" in path:
            batch = self.batches.get(path.split("/")[-1])
            if batch is None:
                return handler._send(404, {"error": {"message": "No batch found"}})
            if batch["status"] not in ("completed", "failed") and not self.hold.is_set():
                self._run(batch)
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
            return handler._send(200, batch)
        handler._send(404, {"error": {"message": "no route"}})

    def _store(self, data: bytes) -> str:
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = data
        return file_id

    def _run(self, batch: dict) -> None:
        outputs, errors = [], []
        for line in self.files[batch["input_file_id"]].decode().splitlines():
            item = json.loads(line)
            prompt = item["body"]["messages"][-1]["content"]
            if prompt in self.fail_prompts:
                errors.append({"id": "r", "custom_id": item["custom_id"], "error": None, "response": {
                    "status_code": 400, "body": {"error": {"message": f"scripted failure for {prompt}"}}}})
            else:
                outputs.append({"id": "r", "custom_id": item["custom_id"], "error": None, "response": {
                    "status_code": 200, "body": self.completion(item["body"], prompt)}})
        batch["output_file_id"] = self._store("".join(json.dumps(o) + "\n" for o in outputs).encode())
        batch["error_file_id"] = self._store("".join(json.dumps(e) + "\n" for e in errors).encode()) if errors else None
        batch["request_counts"].update(completed=len(outputs), failed=len(errors))
        batch["status"] = "completed"


def ask(*prompts, **kwargs):
    return [ChatRequest([{"role": "user", "content": p}], **kwargs) for p in prompts]


def batch_oracle(server, **kwargs):
    return OpenAIBatchOracle("echo", base_url=server.base_url, poll_interval=0.05, **kwargs)


def test_results_map_back_by_custom_id_with_per_row_errors():
    with BatchServer(fail_prompts={"bad"}) as server:
        oracle = batch_oracle(server)
        results = oracle.complete(ask("a", "bad", "c", "a", n=2))
        assert [r.texts for r in results] == [["echo: a #0", "echo: a #1"], [], ["echo: c #0", "echo: c #1"]] + [
            ["echo: a #0", "echo: a #1"]]
        assert "scripted failure for bad" in results[1].error
        assert len(server.batches) == 1 and server.batches["batch_0"]["request_counts"]["total"] == 3
        # Answers are in the cache under the same keys as the online oracle's: nothing is sent again.
        online = OpenAIOracle("echo", base_url=server.base_url).complete(ask("a", "c", n=2))
        assert all(r.cached for r in online) and not server.chat_requests
        again = batch_oracle(server).complete(ask("a", "bad", "c", n=2))
        assert [r.cached for r in again] == [True, False, True] and len(server.batches) == 2  # only "bad" again


def test_large_submissions_are_split_by_count_and_size():
    assert [len(p) for p in split_lines([b"x" * 10] * 5, max_requests=2, max_bytes=1000)] == [2, 2, 1]
    assert [len(p) for p in split_lines([b"x" * 10] * 5, max_requests=100, max_bytes=25)] == [2, 2, 1]
    with pytest.raises(ValueError, match="over the batch limit"):
        split_lines([b"x" * 30], max_requests=10, max_bytes=25)
    with BatchServer() as server:
        results = batch_oracle(server, max_requests_per_batch=3).complete(ask(*[f"q{i}" for i in range(7)]))
        assert [r.text for r in results] == [f"echo: q{i}" for i in range(7)]
        assert sorted(b["request_counts"]["total"] for b in server.batches.values()) == [1, 3, 3]


def test_a_restarted_run_collects_instead_of_resubmitting():
    with BatchServer(hold=True) as server:
        first = batch_oracle(server, max_wait=0.2).complete(ask("x", "y"))
        assert all("still" in r.error and "call complete() again" in r.error for r in first)
        assert len(server.batches) == 1
        server.hold.clear()  # the service finishes the batch while nobody waits
        later = batch_oracle(server)  # a new process would build a new oracle: state is in the cache file
        results = later.complete(ask("y", "x", "z"))
        assert [r.text for r in results] == ["echo: y", "echo: x", "echo: z"]
        assert len(server.batches) == 2  # the old batch collected, one new batch for "z" only
        assert server.batches["batch_1"]["request_counts"]["total"] == 1

        # A stored batch the service no longer knows is dropped, and its requests go out again.
        server.hold.set()
        assert "still" in batch_oracle(server, max_wait=0.1).complete(ask("w"))[0].error
        server.batches.clear()
        lost = batch_oracle(server).complete(ask("w"))[0]
        assert "ended (unknown)" in lost.error
        server.hold.clear()
        assert batch_oracle(server).complete(ask("w"))[0].text == "echo: w"


def test_authentication_error_raises():
    with BatchServer(api_key="right") as server:
        with pytest.raises(OracleConfigurationError, match="Authentication failed"):
            batch_oracle(server, api_key="wrong").complete(ask("a"))
    with pytest.raises(ValueError, match="needs the cache"):
        OpenAIBatchOracle("m", base_url="http://127.0.0.1:9/v1", cache=False)
