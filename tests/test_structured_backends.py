"""Structured output on the wire: the request fields each backend gets for a shaped request,
asserted on a loopback server that identifies itself as llama.cpp, llama-cpp-python, vLLM, an
OpenAI-compatible API or an unknown server; JSON answers come back as marker text; a backend
without support falls back to free text with one logged note."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reflectune_hf.reflection.extract import instruction_status, parse_instruction_reflection
from reflectune_hf.oracles import ChatRequest, OpenAIBatchOracle, OpenAIOracle, OracleConfigurationError
from reflectune_hf.oracles import backends
from reflectune_hf.oracles.structured import Field, MarkedFields, ScoreLine

SHAPE = MarkedFields((Field("New Instruction", 300), Field("New Answer", 600)), analysis_max_chars=200)
MARKED = "1. Vague.\n2. [New Instruction] Explain tides. [End]\n3. [New Answer] The Moon pulls the sea. [End]"
AS_JSON = {"analysis": "1. Vague.", "new_instruction": "Explain tides.", "new_answer": "The Moon pulls the sea."}


class Server(ThreadingHTTPServer):
    """Answers `GET /v1/models` as the server it plays (`owned_by`), `/version`, `/openapi.json`,
    and chat completions: JSON when the body asks for a JSON schema, marker text otherwise."""

    daemon_threads = True

    def __init__(self, owned_by="llamacpp", version=None, title="FastAPI", models_delay=0.0, models_errors=()):
        super().__init__(("127.0.0.1", 0), Handler)
        self.owned_by, self.version, self.title, self.models_delay = owned_by, version, title, models_delay
        self.models_errors = list(models_errors)  # HTTP statuses of the first GET /v1/models, in turn
        self.bodies, self.gets = [], []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _json(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        server = self.server
        server.gets.append(self.path)
        if self.path == "/v1/models":
            time.sleep(server.models_delay)
            if server.models_errors:
                return self._json(server.models_errors.pop(0), {"error": {"message": "Loading model"}})
            return self._json(200, {"object": "list", "data": [{"id": "m", "object": "model",
                                                                "owned_by": server.owned_by}]})
        if self.path == "/version" and server.version:
            return self._json(200, {"version": server.version})
        if self.path == "/openapi.json":
            return self._json(200, {"openapi": "3.1.0", "info": {"title": server.title}})
        self._json(404, {"error": {"message": "no route"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        structured = body.get("structured_outputs") or {}
        wants_json = "response_format" in body or "json" in structured or "guided_json" in body
        text = json.dumps(AS_JSON) if wants_json else MARKED
        self._json(200, {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}})


@pytest.fixture(autouse=True)
def _fresh_detection():
    backends.forget_detections()
    yield
    backends.forget_detections()


def shaped(prompt="Reflect.", shape=SHAPE, **kwargs):
    return ChatRequest([{"role": "user", "content": prompt}], max_tokens=64, answer_format=shape, **kwargs)


def only_structured(body: dict) -> dict:
    plain = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "n"}
    return {k: v for k, v in body.items() if k not in plain}


def test_llama_cpp_server_gets_the_grammar_with_no_other_argument():
    with Server(owned_by="llamacpp") as server:
        oracle = OpenAIOracle("m", base_url=server.base_url)
        result = oracle.complete([shaped()])[0]
        assert only_structured(server.bodies[0]) == {"grammar": SHAPE.gbnf()}
        assert result.text == MARKED
        # Recognised once per process: a second call and a second oracle do not probe again (each
        # oracle checks once that the server is reachable).
        oracle.complete([shaped("Again.")])
        assert server.gets == ["/v1/models", "/v1/models"]  # recognition + reachability
        OpenAIOracle("m", base_url=server.base_url).complete([shaped("Third.")])
        assert server.gets == ["/v1/models"] * 3
        assert [only_structured(b) for b in server.bodies] == [{"grammar": SHAPE.gbnf()}] * 3


def test_llama_cpp_python_server_is_recognised_by_its_openapi_title():
    with Server(owned_by="me", title="\U0001f999 llama.cpp Python API") as server:
        OpenAIOracle("m", base_url=server.base_url).complete([shaped()])
        assert only_structured(server.bodies[0]) == {"grammar": SHAPE.gbnf()}


@pytest.mark.parametrize("version, setting, expected_key", [
    ("0.11.0", "auto", "structured_outputs"), ("0.8.5", "auto", "guided_regex"),
    (None, "auto", "structured_outputs"), ("0.11.0", "guided", "guided_regex"),
    ("0.8.5", "structured_outputs", "structured_outputs"),
])
def test_vllm_fields_by_version_and_setting(version, setting, expected_key):
    with Server(owned_by="vllm", version=version) as server:
        result = OpenAIOracle("m", base_url=server.base_url, vllm_fields=setting).complete([shaped()])[0]
        fields = only_structured(server.bodies[0])
        if expected_key == "structured_outputs":
            assert fields == {"structured_outputs": {"regex": SHAPE.regex()}}
        else:
            assert fields == {"guided_regex": SHAPE.regex()}
        assert result.text == MARKED


@pytest.mark.parametrize("setting, expected", [("structured_outputs", {"structured_outputs": {"json": "schema"}}),
                                               ("guided", {"guided_json": "schema"})])
def test_vllm_json_format_is_turned_back_into_marker_text(setting, expected):
    with Server(owned_by="vllm", version="0.11.0") as server:
        oracle = OpenAIOracle("m", base_url=server.base_url, vllm_fields=setting, vllm_format="json")
        result = oracle.complete([shaped()])[0]
        body = json.loads(json.dumps(only_structured(server.bodies[0])).replace(
            json.dumps(SHAPE.json_schema()), '"schema"'))
        assert body == expected
        assert instruction_status(*parse_instruction_reflection(result.text)) == "ok"
        assert result.text == SHAPE.from_json(json.dumps(AS_JSON))


def test_openai_compatible_api_gets_a_strict_json_schema_and_answers_come_back_as_markers():
    with Server(owned_by="openai") as server:
        result = OpenAIOracle("m", base_url=server.base_url).complete([shaped()])[0]
        fields = only_structured(server.bodies[0])
        assert fields == {"response_format": {"type": "json_schema", "json_schema": {
            "name": "marked_fields", "strict": True, "schema": SHAPE.json_schema(bounded=False)}}}
        assert result.text == ("1. Vague.\n[New Instruction] Explain tides. [End]\n"
                               "[New Answer] The Moon pulls the sea. [End]")
        assert parse_instruction_reflection(result.text) == ("Explain tides.", "The Moon pulls the sea.")
        # The cache holds the marker text: a rerun gets it back as the stage parses it.
        again = OpenAIOracle("m", base_url=server.base_url).complete([shaped()])[0]
        assert again.cached and again.text == result.text


def test_backend_setting_overrides_detection():
    with Server(owned_by="library") as server:
        OpenAIOracle("m", base_url=server.base_url, backend="openai").complete([shaped(shape=ScoreLine(100))])
        assert server.bodies[0]["response_format"]["json_schema"]["name"] == "score_line"
        assert "/v1/models" not in server.gets[1:]  # no recognition probe beyond the reachability check
        OpenAIOracle("m", base_url=server.base_url, backend="llama.cpp").complete([shaped("b")])
        assert only_structured(server.bodies[1]) == {"grammar": SHAPE.gbnf()}


def test_unrecognised_server_falls_back_to_plain_text_with_one_logged_note(caplog):
    with Server(owned_by="library") as server, caplog.at_level(logging.INFO):
        oracle = OpenAIOracle("m", base_url=server.base_url)
        first = oracle.complete([shaped("a"), shaped("b")])
        oracle.complete([shaped("c")])
        assert all(only_structured(body) == {} for body in server.bodies) and len(server.bodies) == 3
        assert first[0].text == MARKED  # free text, parsed as such by the stage
        notes = [r for r in caplog.records if "Structured output is off" in r.getMessage()]
        assert len(notes) == 1 and notes[0].levelno == logging.WARNING
        assert "not recognised" in notes[0].getMessage()


def test_a_server_that_does_not_answer_the_probe_gets_free_text_said_once_and_on_refused(caplog):
    """A server whose GET /models timed out (chats answered) got free text with no note, and
    `structured="on"` sent unenforced requests."""
    with Server(models_delay=1.0) as server, caplog.at_level(logging.INFO):
        first = OpenAIOracle("m", base_url=server.base_url, timeout=0.3, max_retries=0).complete([shaped("a")])
        assert first[0].ok and only_structured(server.bodies[0]) == {}
        notes = [r.getMessage() for r in caplog.records if "Structured output is off" in r.getMessage()]
        assert len(notes) == 1 and "did not answer GET /models" in notes[0]
        with pytest.raises(OracleConfigurationError, match="cannot enforce an answer format"):
            OpenAIOracle("m", base_url=server.base_url, timeout=0.3, structured="on").complete([shaped("b")])
        assert len(server.bodies) == 1


@pytest.mark.parametrize("status", [503, 401, 429])
def test_an_http_error_on_the_probe_is_not_remembered_as_a_plain_server(status):
    """llama.cpp's server answers 503 while it loads its model: the probe's answer was taken as
    "not recognised" and kept for the process, so every later call sent free text to a server
    that has the grammar. A missing route (404) is an answer: that server is plain."""
    with Server(owned_by="llamacpp", models_errors=[status]) as server:
        assert backends.detect_backend(server.base_url, timeout=2) is None
        assert backends.cached_detection(server.base_url) is None
        oracle = OpenAIOracle("m", base_url=server.base_url, max_retries=0)
        oracle.complete([shaped("a")])
        assert only_structured(server.bodies[0]) == {"grammar": SHAPE.gbnf()}
    with Server(owned_by="llamacpp", models_errors=[404, 404]) as server:
        assert backends.detect_backend(server.base_url, timeout=2) == backends.Detected("plain")


def test_structured_on_raises_where_the_backend_cannot():
    with Server(owned_by="library") as server:
        with pytest.raises(OracleConfigurationError, match="cannot enforce an answer format"):
            OpenAIOracle("m", base_url=server.base_url, structured="on").complete([shaped()])
        assert server.bodies == []  # nothing was sent
    with pytest.raises(ValueError, match="backend='plain' cannot"):
        OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", backend="plain", structured=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", backend="tgi")
    with pytest.raises(ValueError, match="structured must be"):
        OpenAIOracle("m", base_url="http://127.0.0.1:9/v1", structured="maybe")


def test_structured_off_sends_and_keys_todays_plain_request():
    with Server(owned_by="llamacpp") as server:
        oracle = OpenAIOracle("m", base_url=server.base_url, structured="off")
        oracle.complete([shaped()])
        assert only_structured(server.bodies[0]) == {}
        plain = ChatRequest([{"role": "user", "content": "Reflect."}], max_tokens=64)
        assert oracle.keys([shaped()]) == oracle.keys([plain])
        assert "/v1/models" in server.gets and len(server.gets) == 1  # reachability only, no recognition


def test_plain_requests_are_untouched_and_probe_nothing():
    with Server(owned_by="vllm") as server:
        OpenAIOracle("m", base_url=server.base_url).complete([ChatRequest([{"role": "user", "content": "Hi"}])])
        assert only_structured(server.bodies[0]) == {} and server.gets == ["/v1/models"]


def test_batch_lines_carry_the_same_fields_and_json_answers_are_cached_as_marker_text(tmp_path):
    from test_oracles_batch import BatchServer

    class JsonBatchServer(BatchServer):
        def completion(self, body, prompt):
            out = super().completion(body, prompt)
            if "response_format" in body:
                out["choices"][0]["message"]["content"] = json.dumps(AS_JSON)
            return out

    with JsonBatchServer() as server:
        oracle = OpenAIBatchOracle("echo", base_url=server.base_url, poll_interval=0.05)
        results = oracle.complete([shaped("a"), ChatRequest([{"role": "user", "content": "plain"}])])
        lines = [json.loads(line) for data in server.files.values() for line in data.decode().splitlines()
                 if '"custom_id"' in line and '"body"' in line and '"url"' in line]
        by_prompt = {line["body"]["messages"][-1]["content"]: line["body"] for line in lines}
        online = OpenAIOracle("m", base_url="https://api.openai.com/v1")._body(shaped("a"), 1, None)
        assert by_prompt["a"]["response_format"] == online["response_format"]
        assert "response_format" not in by_prompt["plain"]
        assert parse_instruction_reflection(results[0].text) == ("Explain tides.", "The Moon pulls the sea.")
        assert results[1].text == "echo: plain"

        # A batch collected by a later run that no longer asks for the request still caches marker text.
        server.hold.set()
        assert "still" in OpenAIBatchOracle("echo", base_url=server.base_url, poll_interval=0.05,
                                            max_wait=0.1).complete([shaped("late"), shaped("other")])[0].error
        server.hold.clear()
        OpenAIBatchOracle("echo", base_url=server.base_url, poll_interval=0.05).complete([shaped("other")])
        late = OpenAIOracle("echo", base_url=server.base_url).complete([shaped("late")])[0]
        assert late.cached and parse_instruction_reflection(late.text) == ("Explain tides.", "The Moon pulls the sea.")


def test_an_unreachable_server_is_logged_without_its_query_secret(caplog):
    """`-v` printed `backend detection: http://host/v1?api_key=<the key> unreachable`: the one
    detection line that logged the URL as given rather than redacted."""
    with caplog.at_level(logging.DEBUG, logger="reflectune_hf.oracles.backends"):
        assert backends.detect_backend("http://127.0.0.1:9/v1?api_key=qs3cret", timeout=1) is None
    assert "did not answer" in caplog.text and "qs3cret" not in caplog.text


def test_a_json_answer_not_of_the_shape_is_parsed_as_its_decoded_text_not_its_escapes():
    # Both fields inside one value (plus quotes, a newline, an accent): not convertible, so the marker
    # parser reads it; it read the JSON source and kept `\"`, `\n` and `\u00e9` literally, as `ok`.
    both = '[New Instruction] Say "hi" en français. [End]\n[New Answer] "Salut" à tous.\nBonne journée. [End]'
    data = {"analysis": "", "new_instruction": both, "new_answer": "x"}
    text = backends.decode_answer(SHAPE, json.dumps(data))
    assert parse_instruction_reflection(text) == ('Say "hi" en français.', '"Salut" à tous.\nBonne journée.')
    assert backends.decode_answer(SHAPE, "[New Instruction] A [End]") == "[New Instruction] A [End]"  # no JSON


def _raw_server(reply: bytes) -> str:
    """A server that answers every connection with `reply`, whatever was asked; its base URL."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def run():
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_detection_survives_a_server_that_speaks_no_http_a_cut_body_or_an_odd_openapi():
    """Detection raised http.client's BadStatusLine / IncompleteRead (a wrong port, a proxy that cut
    the body) or an AttributeError (`info` not an object) out of `complete`, deep inside."""
    no_http = _raw_server(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert backends.detect_backend(no_http, timeout=2) is None and backends.cached_detection(no_http) is None
    cut = _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"data\"")
    assert backends.detect_backend(cut, timeout=2) is None
    odd = b'{"info": "x"}'
    odd_url = _raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(odd), odd))
    assert backends.detect_backend(odd_url, timeout=2) == backends.Detected("plain")


def test_json_in_a_markdown_fence_is_read_as_its_json():
    """A server that does not enforce the schema (backend='openai' set for a compatible API) may
    wrap its JSON in ```json fences: the answer went to the marker parser as text, re-asked and
    fell back, though it was of the shape."""
    fenced = "```json\n" + json.dumps(AS_JSON, indent=1) + "\n```\n"
    assert backends.decode_answer(SHAPE, fenced) == backends.decode_answer(SHAPE, json.dumps(AS_JSON))
    assert parse_instruction_reflection(backends.decode_answer(SHAPE, fenced)) == (
        "Explain tides.", "The Moon pulls the sea.")
    code = "```\nprint('hi')\n```"  # not JSON inside: the answer as it came
    assert backends.decode_answer(SHAPE, code) == code
