"""OpenAIBatchOracle against a local server implementing the files and batches endpoints.

There is no real Batch service here: `BatchServer` follows OpenAI's documented wire format
(JSONL input with custom_id, output and error files, batch status and request counts).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP

import pytest

from reflectune_hf.oracles import ChatRequest, OpenAIBatchOracle, OpenAIOracle, OracleCache, OracleConfigurationError
from reflectune_hf.oracles.batch import split_lines
from loopback import LoopbackServer


class BatchServer(LoopbackServer):
    """Files and batches endpoints; a batch completes on its first poll unless `hold` is set.

    Scripted trouble: `outcomes` (the end states of the first batches: "expired" and
    "cancelled" answer `answer_limit` requests, expired ones list the others in the error file;
    "failed" answers none), `corrupt` (`{prompt: "truncate" | "garbage" | "no_id"}` spoils that
    prompt's output line) and `route_faults` (`{"upload" | "poll" | "download": [HTTP status or
    None for attempt 1, 2, ...]}`).
    """

    def __init__(self, fail_prompts=(), hold=False, outcomes=(), answer_limit=0, corrupt=None, route_faults=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.fail_prompts = set(fail_prompts)
        self.hold = threading.Event()
        if hold:
            self.hold.set()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.outcomes, self.answer_limit, self.corrupt = list(outcomes), answer_limit, corrupt or {}
        self.route_faults, self.route_attempts = route_faults or {}, Counter()

    def _fault(self, handler, route) -> bool:
        """Answer with the scripted status of this attempt at `route`, if there is one."""
        with self._lock:
            self.route_attempts[route] += 1
            script = self.route_faults.get(route) or []
            status = script[self.route_attempts[route] - 1] if self.route_attempts[route] <= len(script) else None
        if status is not None:
            handler.send_json(status, {"error": {"message": f"scripted {status} on {route}", "type": "server_error"}})
        return status is not None

    def extra_post(self, handler, raw):
        path = handler.path.rstrip("/")
        self.record(path, None, "post")
        if not handler._authorized():
            return
        if path.endswith("/files") and self._fault(handler, "upload"):
            return
        if path.endswith("/files"):
            message = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
            part = next(p for p in message.iter_parts() if p.get_param("name", header="content-disposition") == "file")
            file_id = self._store(part.get_payload(decode=True))
            return handler.send_json(200, {"id": file_id, "object": "file", "bytes": len(self.files[file_id]),
                                           "created_at": int(time.time()), "filename": "input.jsonl",
                                           "purpose": "batch", "status": "processed"})
        if path.endswith("/batches"):
            body = json.loads(raw)
            lines = self.files[body["input_file_id"]].decode().splitlines()
            batch_id = f"batch_{len(self.batches)}"
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"], "status": "validating", "created_at": int(time.time()),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": body.get("metadata")}
            return handler.send_json(200, self.batches[batch_id])
        handler.send_json(404, {"error": {"message": "no route"}})

    def extra_get(self, handler):
        path = handler.path.rstrip("/")
        if "/files/" in path and path.endswith("/content"):
            if not self._fault(handler, "download"):
                handler.send_json(200, self.files[path.split("/")[-2]])
            return
        if "/batches/" in path:
            if self._fault(handler, "poll"):
                return
            batch = self.batches.get(path.split("/")[-1])
            if batch is None:
                return handler.send_json(404, {"error": {"message": "No batch found"}})
            if batch["status"] in ("validating", "in_progress") and not self.hold.is_set():
                self._run(batch)
            elif batch["status"] == "validating":
                batch["status"] = "in_progress"
            return handler.send_json(200, batch)
        handler.send_json(404, {"error": {"message": "no route"}})

    def _store(self, data: bytes) -> str:
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = data
        return file_id

    def _run(self, batch: dict) -> None:
        outcome = self.outcomes.pop(0) if self.outcomes else "completed"
        if outcome == "failed":  # rejected as a whole: no files, the reasons in `errors`
            batch.update(status="failed", errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "scripted validation failure", "line": 1}]})
            return
        outputs, errors = [], []
        for number, line in enumerate(self.files[batch["input_file_id"]].decode().splitlines()):
            item = json.loads(line)
            prompt = item["body"]["messages"][-1]["content"]
            if outcome != "completed" and number >= self.answer_limit:
                if outcome == "expired":  # as OpenAI does: the requests not run are in the error file
                    errors.append({"id": "r", "custom_id": item["custom_id"], "response": None, "error": {
                        "code": "batch_expired", "message": "not executed before the completion window expired"}})
            elif prompt in self.fail_prompts:
                errors.append({"id": "r", "custom_id": item["custom_id"], "error": None, "response": {
                    "status_code": 400, "body": {"error": {"message": f"scripted failure for {prompt}"}}}})
            else:
                outputs.append({"id": "r", "custom_id": item["custom_id"], "error": None, "response": {
                    "status_code": 200, "body": self.completion(item["body"], prompt)}})
        lines = [self._spoil(json.dumps(o), o["response"]["body"]["choices"][0]["message"]["content"])
                 for o in outputs]
        batch["output_file_id"] = self._store("".join(line + "\n" for line in lines).encode())
        batch["error_file_id"] = self._store("".join(json.dumps(e) + "\n" for e in errors).encode()) if errors else None
        batch["request_counts"].update(completed=len(outputs), failed=len(errors))
        batch["status"] = outcome

    def _spoil(self, line: str, answer: str) -> str:
        kind = self.corrupt.get(answer.removeprefix("echo: "))
        if kind == "truncate":  # cut after the custom_id: the row can still be told
            return line[:line.index('"response"') + 15]
        if kind == "no_id":
            return json.dumps({k: v for k, v in json.loads(line).items() if k != "custom_id"})
        return "}{ not json at all" if kind == "garbage" else line


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


def batch_count(server):
    return [b["request_counts"]["total"] for b in server.batches.values()]


def test_unreadable_output_lines_are_per_row_errors_and_good_answers_are_cached():
    corrupt = {"cut": "truncate", "junk": "garbage", "anon": "no_id"}
    prompts = ["a", "cut", "junk", "anon", "e"]
    with BatchServer(corrupt=corrupt) as server:
        results = batch_oracle(server).complete(ask(*prompts))
        assert [r.text for r in results] == ["echo: a", "", "", "", "echo: e"]
        assert "unreadable batch output line 2" in results[1].error  # its custom_id survived the cut
        for result in results[2:4]:  # whose line it was cannot be told: every row left without an answer
            assert "2 unreadable output line(s)" in result.error and "a rerun submits it again" in result.error
        assert len(OracleCache()) == 2
        # The batch is collected (its unreadable answers cannot be recovered): a rerun resubmits only those.
        server.corrupt.clear()
        again = batch_oracle(server).complete(ask(*prompts))
        assert [r.text for r in again] == [f"echo: {p}" for p in prompts]
        assert [r.cached for r in again] == [True, False, False, False, True] and batch_count(server) == [5, 3]


def test_a_failed_download_leaves_the_batch_to_be_collected_next_run():
    # Downloads: 1 (output file, run 1) fails; 2 (output, run 2) works; 3 (error file, run 2) fails.
    with BatchServer(fail_prompts={"bad"}, route_faults={"download": [500, None, 500]}) as server:
        first = batch_oracle(server, max_retries=0).complete(ask("a", "b", "bad"))
        assert all("could not download" in r.error and "HTTP 500" in r.error and "not be resubmitted" in r.error
                   for r in first)
        assert len(OracleCache()) == 0 and len(server.batches) == 1
        second = batch_oracle(server, max_retries=0).complete(ask("a", "b", "bad"))
        assert [r.text for r in second[:2]] == ["echo: a", "echo: b"]  # read and cached before the failure
        assert "could not download" in second[2].error and len(OracleCache()) == 2
        third = batch_oracle(server, max_retries=0).complete(ask("a", "b", "bad"))
        assert [r.cached for r in third] == [True, True, False] and "scripted failure for bad" in third[2].error
        assert len(server.batches) == 1  # nothing paid twice: the same batch was collected each time
        assert "scripted failure" in batch_oracle(server).complete(ask("bad"))[0].error
        assert batch_count(server) == [3, 1]  # collected at last, so a failed row goes out again


@pytest.mark.parametrize("outcome", ["expired", "cancelled", "failed"])
def test_batches_that_did_not_complete_give_per_row_errors(outcome):
    with BatchServer(outcomes=[outcome], answer_limit=1) as server:
        results = batch_oracle(server).complete(ask("x", "y", "z"))
        answered = 0 if outcome == "failed" else 1
        assert [r.ok for r in results] == [True] * answered + [False] * (3 - answered)
        expected = {"expired": "batch_expired: not executed before the completion window expired",
                    "cancelled": "ended (cancelled) without an answer",
                    "failed": "ended (failed: scripted validation failure) without an answer"}[outcome]
        assert all(expected in r.error for r in results[answered:])
        again = batch_oracle(server).complete(ask("x", "y", "z"))
        assert [r.text for r in again] == ["echo: x", "echo: y", "echo: z"]
        assert batch_count(server) == [3, 3 - answered]  # only the unanswered rows are submitted again


def test_status_checks_that_never_succeed_are_not_reported_as_ended():
    with BatchServer(route_faults={"poll": [503] * 1000}) as server:
        results = batch_oracle(server, max_wait=0.3, max_retries=0).complete(ask("p", "q"))
        for result in results:
            assert "could not check batch batch_0 (HTTP 503" in result.error and "not be resubmitted" in result.error
            assert "ended" not in result.error
        server.route_faults.clear()
        assert [r.text for r in batch_oracle(server).complete(ask("p", "q"))] == ["echo: p", "echo: q"]
        assert len(server.batches) == 1


def test_a_failed_upload_is_an_error_for_its_part_only():
    with BatchServer(route_faults={"upload": [None, 500]}) as server:
        oracle = batch_oracle(server, max_retries=0, max_requests_per_batch=2)
        results = oracle.complete(ask("a", "b", "c", "d"))
        assert [r.ok for r in results] == [True, True, False, False]
        assert all("could not submit a batch (HTTP 500" in r.error for r in results[2:])
        again = batch_oracle(server, max_requests_per_batch=2).complete(ask("a", "b", "c", "d"))
        assert [r.text for r in again] == ["echo: a", "echo: b", "echo: c", "echo: d"]
        assert batch_count(server) == [2, 2]


def test_credentials_in_base_url_are_sent_as_basic_auth_and_kept_out_of_the_cache():
    with BatchServer(basic_auth=("user", "s3cret")) as server:
        url = server.base_url.replace("http://", "http://user:s3cret@")
        oracle = OpenAIBatchOracle("echo", base_url=url, poll_interval=0.01)
        assert [r.text for r in oracle.complete(ask("a"))] == ["echo: a"]  # a 401 would have raised
        assert oracle.base_url == server.base_url and "s3cret" not in repr(oracle)
    rows = OracleCache().execute("SELECT * FROM batch_jobs") + OracleCache().execute("SELECT * FROM responses")
    assert rows and "s3cret" not in repr(rows)
