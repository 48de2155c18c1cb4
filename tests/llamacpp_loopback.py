"""A llama-cpp-python-shaped completions server on 127.0.0.1 for the served-student tests.

It answers `GET /v1/models` (`owned_by: "me"`), `GET /openapi.json` (llama-cpp-python's title)
and `POST /v1/completions` with text prompts, tokenised with a local tokenizer, the way
llama-cpp-python 0.3.36's `Llama._create_completion` builds `logprobs` (llama.py, the echo
branch), including its off-by-one: with `echo=True` and a prompt that does not start with BOS,
entry idx pairs token t_idx with the distribution after t_idx (which predicts t_idx+1), its
`top_logprobs` are that distribution's top-k keyed by token text and then updated with
`{text of t_idx: that wrong value}`, entries of BOS tokens are skipped, the first entry is
None, and no generated token is echoed. `logit_bias` changes the generated token only.
`reading="fixed"` answers as a server without the off-by-one (each token with the
distribution that predicts it, the generated token last); `reading="noise"` echoes values
that match neither reading.

It is not a model: the distribution after a context depends on its last token p only,
`log_softmax(N(0, 2) logits seeded by p, +30 on the tokens in likely[p])` (`Fake.logprobs`),
so a test knows every value exactly. `prompt_tokens_off` adds that many to `usage.prompt_tokens`
of non-echo answers (a server that tokenised the forced request's prompt differently).
"""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer
from typing import Optional

import numpy as np
from loopback import JSONHandler


class Fake:
    """The loopback's model over `tokenizer`'s vocabulary."""

    def __init__(self, tokenizer, likely: Optional[dict] = None):
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.likely = {int(k): [int(t) for t in v] for k, v in (likely or {}).items()}
        self._rows: dict = {}

    def logprobs(self, previous: int) -> np.ndarray:
        if previous not in self._rows:
            logits = np.random.default_rng(int(previous)).standard_normal(self.vocab) * 2.0
            logits[self.likely.get(int(previous), [])] += 30.0
            top = logits.max()
            self._rows[previous] = logits - (top + np.log(np.exp(logits - top).sum()))
        return self._rows[previous]

    def text(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False).replace("\ufffd", "")

    def top(self, row: np.ndarray, k: int) -> dict:
        part = np.argpartition(-row, k)[:k] if k < len(row) else np.arange(len(row))
        best = part[np.argsort(-row[part], kind="stable")]  # best first: a later token of the same text wins
        return {self.text([int(i)]): float(row[i]) for i in best}


def completion(fake: Fake, body: dict, reading: str = "shifted", prompt_tokens_off: int = 0) -> dict:
    """llama-cpp-python's answer to `body` in the fake model."""
    prompt = fake.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
    n, k = len(prompt), int(body.get("logprobs") or 0)
    rows = [fake.logprobs(t) for t in prompt]  # rows[j]: the distribution after prompt[: j + 1]
    last = rows[-1].copy()
    for token, bias in (body.get("logit_bias") or {}).items():
        last[int(token)] += float(bias)
    generated = int(np.argmax(last))
    bos = fake.tokenizer.bos_token_id
    tokens, offsets, values, tops = [], [], [], []
    if body.get("echo"):
        if reading == "fixed":  # as a prompt that starts with BOS: token i after the row before it
            pairs = [(i, t, rows[i - 1] if i else None) for i, t in enumerate(prompt + [generated])]
        else:  # the off-by-one: token i with row i, the generated token dropped by zip
            pairs = [(i, t, rows[i]) for i, t in enumerate(prompt)]
        for i, t, row in pairs:
            if t == bos:
                continue
            tokens.append(fake.text([t]))
            offsets.append(len(fake.text((prompt + [generated])[:i])))
            if row is None:
                values.append(None)
                tops.append(None)
                continue
            value = float(row[t]) if reading != "noise" else -0.25 * (1 + (t % 7))
            top = fake.top(row, k) if reading != "noise" else {}
            top.update({tokens[-1]: value})
            values.append(value)
            tops.append(top)
        values[0], tops[0] = None, None
        text = body["prompt"] + fake.text([generated])
        usage_prompt = n
    else:
        row = rows[-1]
        top = fake.top(row, k)
        top.update({fake.text([generated]): float(row[generated])})
        tokens, offsets, values, tops = [fake.text([generated])], [len(body["prompt"])], [float(row[generated])], [top]
        text = fake.text([generated])
        usage_prompt = n + prompt_tokens_off
    logprobs = {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops} if k else None
    return {"id": "cmpl-loopback", "object": "text_completion", "model": body.get("model"),
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": 1, "total_tokens": usage_prompt + 1}}


class _Handler(JSONHandler):
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.rstrip("/")
        if path.endswith("/models"):
            self.send_json(200, {"object": "list", "data": [{"id": self.server.owner.model, "owned_by": "me"}]})
        elif path.endswith("/openapi.json"):
            self.send_json(200, {"info": {"title": "🦙 llama.cpp Python API"}})
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        owner = self.server.owner
        with owner.lock:
            owner.bodies.append(body)
            answer = completion(owner.fake, body, owner.reading, owner.prompt_tokens_off)
        self.send_json(200, answer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class LlamaCppLoopback:
    """`with LlamaCppLoopback(tokenizer, likely={...}) as server:` at `server.base_url`."""

    def __init__(self, tokenizer, likely: Optional[dict] = None, reading: str = "shifted", model: str = "student",
                 prompt_tokens_off: int = 0):
        self.fake = Fake(tokenizer, likely)
        self.model, self.reading, self.prompt_tokens_off = model, reading, prompt_tokens_off
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "LlamaCppLoopback":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
