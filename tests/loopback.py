"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks (test code: it is not part of the package).

It answers `POST /v1/chat/completions` and `GET /v1/models` with a configurable latency and
faults chosen per prompt and attempt (429 with `Retry-After`, 500, 503, a response slower than
any sane timeout, a 200 whose body is truncated JSON or JSON without `choices`, a dropped
connection, 401, 404), counts every request and every answer delivered in full, and can instead
forward each request to a real upstream server (a counting proxy).

It is not an LLM: by default the answer to a prompt is `"echo: <prompt>"`. Run it alone with
`python tests/loopback.py --latency 0.2` (it prints its base URL).

Example:
    >>> from reflectune_hf.oracles import ChatRequest, OpenAIOracle
    >>> from loopback import LoopbackServer
    >>> with LoopbackServer(faults={"b": ["500", "ok"]}) as server:
    ...     oracle = OpenAIOracle("echo", base_url=server.base_url, cache=False)
    ...     [r.text for r in oracle.complete([ChatRequest([{"role": "user", "content": p}]) for p in "ab"])]
    ['echo: a', 'echo: b']
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import random
import select
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union

ACTIONS = ("ok", "429", "500", "503", "slow", "malformed", "no_choices", "drop", "401", "404")
Faults = Union[None, dict, Callable[[str, int], Optional[str]]]


def _prompt_of(body: dict) -> str:
    messages = body.get("messages") or [{}]
    return str(messages[-1].get("content", ""))


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet keep-alive handler that answers JSON: the base of the tests' loopback servers."""

    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

    def log_message(self, *args) -> None:  # quiet
        pass

    def send_json(self, status: int, payload, headers: Optional[dict] = None) -> bool:
        """Write one response (a JSON-able payload, or bytes as they are); False when the client
        is gone (it gave up: a timeout)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except OSError:  # the client gave up (timeout): nothing to do
            self.close_connection = True
            return False


class _Handler(JSONHandler):
    server: "_Server"

    def _client_gone(self) -> bool:
        """Whether the client closed the connection while its request was being answered."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _authorized(self) -> bool:
        owner = self.server.owner
        key, sent = owner.api_key, self.headers.get("Authorization", "")
        if owner.basic_auth is not None:
            token = base64.b64encode(":".join(owner.basic_auth).encode()).decode()
            if sent == f"Basic {token}":
                return True
            error = {"error": {"message": "Basic authentication required", "type": "invalid_request_error"}}
            self.send_json(401, error, {"WWW-Authenticate": 'Basic realm="loopback"'})
            return False
        if key is None or sent == f"Bearer {key}":
            return True
        # Like real services, the message quotes what was sent: clients must redact it.
        self.send_json(401, {"error": {"message": f"Incorrect API key provided: {sent[7:]}",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}})
        return False

    def do_GET(self) -> None:
        owner = self.server.owner
        if owner.upstream:
            return self._forward(None)
        owner.record(self.path, None, "ok")
        if not self._authorized():
            return
        if self.path.rstrip("/").endswith("/models"):
            return self.send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
        owner.extra_get(self)

    def do_POST(self) -> None:
        owner = self.server.owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if owner.upstream:
            return self._forward(raw)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return owner.extra_post(self, raw)
        body = json.loads(raw or b"{}")
        prompt = _prompt_of(body)
        action = owner.action_for(prompt)
        owner.record(self.path, prompt, action, body)
        with owner.in_flight():
            self._chat(owner, body, prompt, action)

    def _chat(self, owner: "LoopbackServer", body: dict, prompt: str, action: str) -> None:
        if not self._authorized():
            return
        owner.sleep_latency()
        if action == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
        elif action == "429":
            self.send_json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                           {"Retry-After": owner.retry_after})
        elif action in ("500", "503", "401", "404"):
            self.send_json(int(action), {"error": {"message": f"scripted {action}", "type": "server_error"}})
        elif action == "malformed":
            self.send_json(200, b'{"id": "chatcmpl-x", "choices": [{"index": 0, "message": {"content": "trunc')
        elif action == "no_choices":
            self.send_json(200, {"id": "chatcmpl-x", "object": "chat.completion", "model": owner.model})
        else:
            if action == "slow":
                time.sleep(owner.slow_seconds)
                if self._client_gone():  # it timed out: an answer written now would reach no one
                    self.close_connection = True
                    return
            if self.send_json(200, owner.completion(body, prompt)):
                owner.record_delivery(prompt)

    def _forward(self, raw: Optional[bytes]) -> None:
        owner = self.server.owner
        owner.record(self.path, _prompt_of(json.loads(raw)) if raw else None, "forward")
        with owner.in_flight():
            self._relay(owner, raw)

    def _relay(self, owner: "LoopbackServer", raw: Optional[bytes]) -> None:
        # /v1/... maps onto the upstream base URL; any other path (/openapi.json, /version, /health)
        # onto the upstream's root, where servers answer them.
        if self.path.startswith("/v1"):
            url = owner.upstream.rstrip("/") + self.path[len("/v1"):]
        else:
            parts = urllib.parse.urlsplit(owner.upstream)
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, self.path, "", ""))
        key = (self.path, raw) if owner.replay and raw is not None else None
        with owner._lock:
            replayed = owner._replies.get(key) if key else None
        if replayed is not None:
            self.send_json(200, replayed)
            return
        request = urllib.request.Request(url, data=raw, method="POST" if raw is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as err:
            self.send_json(err.code, err.read())
            return
        if key and status == 200:
            with owner._lock:
                owner._replies.setdefault(key, body)
        self.send_json(status, body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is not a server error
            super().handle_error(request, client_address)


class LoopbackServer:
    """A scripted chat-completions server on a free port of 127.0.0.1 (start/stop or `with`).

    Args:
        latency, jitter: seconds before each chat answer: `latency + uniform(-jitter, jitter)`.
        faults: `{prompt: [action of attempt 1, attempt 2, ...]}` (later attempts are "ok"), or a
            callable `(prompt, attempt) -> action`; actions: `ACTIONS`.
        error_rate: probability that an unscripted request gets a "429" or "500" (benchmarks).
        api_key: when set, requests without `Authorization: Bearer <api_key>` get a 401.
        basic_auth: `(user, password)`: when set, requests without that HTTP basic auth get a 401
            (a server behind a proxy that takes `http://user:password@host/v1`).
        honor_n: return `n` choices (False mimics llama.cpp, which returns one).
        upstream: forward every request to this base URL instead (a counting proxy).
        replay: with `upstream`, answer a POST body relayed before with the upstream's first answer
            to it, byte for byte, without asking again (a deterministic upstream: llama.cpp reuses a
            cached prompt prefix, and the rest, evaluated in other batch sizes, can round a greedy
            near-tie the other way, so two runs could otherwise see two answers to one request).
        retry_after: the `Retry-After` header of 429s. slow_seconds: how long "slow" waits.

    Attributes:
        log: one `{"path", "prompt", "action", "time", "body"}` dict per request received (`body`:
            the JSON of a chat request, else None).
        delivered: per prompt, the completions written in full to a client still waiting for them
            (what a paying user is billed for).
        peak_in_flight: the most chat (or forwarded) requests handled at the same moment.
    """

    def __init__(self, latency: float = 0.0, jitter: float = 0.0, faults: Faults = None, error_rate: float = 0.0,
                 api_key: Optional[str] = None, honor_n: bool = True, upstream: Optional[str] = None,
                 retry_after: str = "1", slow_seconds: float = 5.0, model: str = "echo", seed: int = 0,
                 basic_auth: Optional[tuple[str, str]] = None, replay: bool = False):
        self.latency, self.jitter, self.faults, self.error_rate = latency, jitter, faults, error_rate
        self.api_key, self.honor_n, self.upstream, self.model = api_key, honor_n, upstream, model
        self.retry_after, self.slow_seconds = retry_after, slow_seconds
        self.replay, self._replies = replay, {}
        self.basic_auth = tuple(basic_auth) if basic_auth is not None else None
        self.log: list[dict] = []
        self.delivered: Counter = Counter()
        self._attempts: Counter = Counter()
        self.peak_in_flight = self._in_flight = 0
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server: Optional[_Server] = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        threading.Thread(target=self._server.serve_forever, name="loopback-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- behaviour ----------------------------------------------------------------------------
    def record(self, path: str, prompt: Optional[str], action: str, body: Optional[dict] = None) -> None:
        with self._lock:
            self.log.append({"path": path, "prompt": prompt, "action": action, "time": time.time(), "body": body})

    def record_delivery(self, prompt: str) -> None:
        with self._lock:
            self.delivered[prompt] += 1

    @contextlib.contextmanager
    def in_flight(self):
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def chat_requests(self) -> list[dict]:
        """The log entries of chat completion requests (retries included)."""
        with self._lock:
            return [e for e in self.log if e["path"].rstrip("/").endswith("/chat/completions")]

    def action_for(self, prompt: str) -> str:
        with self._lock:
            self._attempts[prompt] += 1
            attempt = self._attempts[prompt]
            if callable(self.faults):
                return self.faults(prompt, attempt) or "ok"
            script = (self.faults or {}).get(prompt)
            if script is not None:
                return script[attempt - 1] if attempt <= len(script) else "ok"
            if self.error_rate and self._random.random() < self.error_rate:
                return self._random.choice(["429", "500"])
            return "ok"

    def sleep_latency(self) -> None:
        if self.latency or self.jitter:
            with self._lock:
                delay = self.latency + self._random.uniform(-self.jitter, self.jitter)
            time.sleep(max(0.0, delay))

    def completion(self, body: dict, prompt: str) -> dict:
        """The answer to a chat request: `n` (or one) choices echoing the prompt."""
        n = int(body.get("n") or 1) if self.honor_n else 1
        seed = body.get("seed")
        choices = []
        for i in range(n):
            suffix = f" #{i}" if n > 1 else ""
            text = f"echo: {prompt}{suffix}" + (f" (seed {seed})" if seed is not None else "")
            choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            if body.get("logprobs"):
                k = int(body.get("top_logprobs") or 0)
                choice["logprobs"] = {"content": [
                    {"token": tok, "logprob": -0.5, "bytes": None,
                     "top_logprobs": [{"token": tok, "logprob": -0.5 - j, "bytes": None} for j in range(k)]}
                    for tok in text.split(" ")]}
            choices.append(choice)
        words = len(prompt.split())
        out = sum(len(c["message"]["content"].split()) for c in choices)
        return {"id": f"chatcmpl-{len(self.log)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", self.model), "choices": choices,
                "usage": {"prompt_tokens": words, "completion_tokens": out, "total_tokens": words + out}}

    def extra_post(self, handler: _Handler, raw: bytes) -> None:
        """Other POST routes (subclasses add endpoints); 404 here."""
        handler.send_json(404, {"error": {"message": f"no route {handler.path}"}})

    def extra_get(self, handler: _Handler) -> None:
        """Other GET routes (subclasses add endpoints); 404 here."""
        handler.send_json(404, {"error": {"message": f"no route {handler.path}"}})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--jitter", type=float, default=0.05)
    parser.add_argument("--error_rate", type=float, default=0.0)
    parser.add_argument("--retry_after", default="1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = LoopbackServer(latency=args.latency, jitter=args.jitter, error_rate=args.error_rate,
                            retry_after=args.retry_after, seed=args.seed).start()
    print(json.dumps({"base_url": server.base_url}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
