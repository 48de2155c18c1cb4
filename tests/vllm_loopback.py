"""A vLLM-shaped completions server on 127.0.0.1 for the served-student tests.

It answers `GET /v1/models` (`owned_by: "vllm"`), `GET /version` and `POST /v1/completions` with
token-id prompts the way vLLM does: `prompt_logprobs` (one entry per prompt token, None first,
then `{"<id>": {"logprob", "rank", "decoded_token"}}`) and, when `logprobs` is asked, the
generated token's `top_logprobs` keyed `"token_id:<id>"` (`return_tokens_as_token_ids`). It is
not a model: the log-probability of token t after token p is `fake_logprob(p, t)`, so a test
knows every loss exactly. It records every request body and can answer with faults
(`faults`: actions taken by the successive requests, `"429"` with `Retry-After: 1`, `"500"`,
`"ok"`; `fail_after`: every request after that many answers gets a 500) or slowly (`delay`).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Optional

from loopback import JSONHandler

RATING_TOP = {33: -2.0, 34: -1.5, 35: -1.0, 36: -2.5, 37: -3.0, 198: -0.5}  # SmolLM2's "1".."5" and "\n"


def fake_logprob(previous: int, token: int) -> float:
    """The loopback's log-probability of `token` after `previous`."""
    return -(((previous * 31 + token) % 97) + 1) / 20.0


class _Handler(JSONHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/").endswith("/models"):
            self.send_json(200, {"object": "list", "data": [{"id": self.server.model, "owned_by": "vllm"}]})
        elif self.path.rstrip("/") == "/version":
            self.send_json(200, {"version": "0.11.0"})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        owner = self.server.owner
        if owner.delay:
            time.sleep(owner.delay)
        with owner.lock:
            owner.bodies.append(body)
            action = owner.faults.pop(0) if owner.faults else "ok"
            if owner.fail_after is not None and owner.answered >= owner.fail_after:
                action = "500"
            if action == "ok":
                owner.answered += 1
        if action == "429":
            self.send_json(429, {"error": {"message": "rate limited"}}, {"Retry-After": "1"})
        elif action == "500":
            self.send_json(500, {"error": {"message": "internal error"}})
        else:
            self.send_json(200, answer(body))


def answer(body: dict) -> dict:
    """vLLM's completions answer to `body` (token-id prompt) in the loopback's fake model."""
    ids = body["prompt"]
    choice = {"index": 0, "text": "\n", "finish_reason": "length", "logprobs": None}
    if body.get("prompt_logprobs") is not None:
        choice["prompt_logprobs"] = [None] + [
            {str(t): {"logprob": fake_logprob(p, t), "rank": 1, "decoded_token": f"<{t}>"}}
            for p, t in zip(ids[:-1], ids[1:])]
    if body.get("logprobs"):
        top = dict(sorted(RATING_TOP.items(), key=lambda kv: -kv[1])[: int(body["logprobs"])])
        choice["logprobs"] = {"tokens": ["token_id:198"], "token_logprobs": [-0.5], "text_offset": [0],
                              "top_logprobs": [{f"token_id:{i}": v for i, v in top.items()}]}
    return {"id": "cmpl-loopback", "object": "text_completion", "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class VllmLoopback:
    """`with VllmLoopback(model="m") as server:` a vLLM-shaped server at `server.base_url`."""

    def __init__(self, model: str = "student", faults=None, fail_after: Optional[int] = None, delay: float = 0.0):
        self.model = model
        self.delay = delay
        self.faults = list(faults or [])
        self.fail_after = fail_after
        self.bodies: list[dict] = []
        self.answered = 0
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner, self._httpd.model = self, model
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def completions(self) -> list[dict]:
        return list(self.bodies)

    def __enter__(self) -> "VllmLoopback":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
