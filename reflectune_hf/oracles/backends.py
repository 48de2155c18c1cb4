"""Which server an OpenAI-compatible oracle talks to, and how it enforces an answer shape.

`OpenAIOracle(..., backend="auto", structured="auto")` recognises the server once per process
and base URL (`detect_backend`), then adds the native fields of that server to each request that
carries an `answer_format` (`structured_fields`):

| backend    | recognised by                                              | request fields                     |
|------------|------------------------------------------------------------|------------------------------------|
| `llamacpp` | `GET /v1/models`: `owned_by: "llamacpp"` (llama.cpp's      | `grammar` (GBNF)                   |
|            | `llama-server`); llama-cpp-python's server answers         |                                    |
|            | `owned_by: "me"`, so its `/openapi.json` title is read     |                                    |
| `vllm`     | `GET /v1/models`: `owned_by: "vllm"`; `GET /version`       | `structured_outputs: {"regex"}`    |
|            |                                                            | (vLLM >= 0.10.2) or `guided_regex` |
|            |                                                            | (vLLM < 0.12)                      |
| `openai`   | the host `api.openai.com` / `*.openai.azure.com`, or       | `response_format: json_schema`     |
|            | `owned_by` `openai` / `system`                             | (strict), answer turned back into  |
|            |                                                            | the marker text                    |
| `plain`    | anything else (Ollama, TGI, ...)                           | none: free text, one logged note   |

vLLM's fields (`vllm_fields`): `structured_outputs` is read by vLLM 0.10.2 and later (the
`guided_*` fields were deprecated in 0.10.2 and removed in 0.12.0); `guided` sends the older
`guided_regex` / `guided_json` (vLLM up to 0.11); `auto` reads `GET /version` and picks
`guided` below 0.10.2, `structured_outputs` otherwise. `vllm_format`: `regex` (default: the
answer is the marker text itself) or `json` (a JSON schema, turned back like OpenAI's).

Example:
    >>> from reflectune_hf.oracles.backends import identify_backend, structured_fields
    >>> from reflectune_hf.oracles.structured import Field, MarkedFields
    >>> identify_backend({"data": [{"id": "m", "owned_by": "vllm"}]}, "http://127.0.0.1:8000/v1")
    'vllm'
    >>> shape = MarkedFields((Field("Better Answer", 100),))
    >>> sorted(structured_fields(shape, "vllm", vllm_fields="guided")[0])
    ['guided_regex']
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from .base import OracleConfigurationError
from .cache import redact_url
from .structured import AnswerFormat

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "llamacpp", "vllm", "openai", "plain")
STRUCTURED_MODES = ("auto", "on", "off")
VLLM_FIELDS = ("auto", "structured_outputs", "guided")
VLLM_FORMATS = ("regex", "json")
VLLM_STRUCTURED_OUTPUTS_SINCE = (0, 10, 2)
_OPENAI_HOSTS = ("api.openai.com", ".openai.azure.com")


def structured_mode(value: Any) -> str:
    """`"auto"`, `"on"` or `"off"` from True/False/None or those words (any case; "true"/"false" too).

    Example:
        >>> from reflectune_hf.oracles.backends import structured_mode
        >>> structured_mode(True), structured_mode("OFF"), structured_mode(None)
        ('on', 'off', 'auto')
    """
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    words = {"auto": "auto", "on": "on", "true": "on", "yes": "on", "off": "off", "false": "off", "no": "off"}
    mode = words.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(f"structured must be 'auto', 'on' (True) or 'off' (False), got {value!r}")
    return mode


def check_choice(name: str, value: Any, choices: tuple) -> str:
    """`value` lower-cased when it is one of `choices` (for `backend`, "llama.cpp" and "llama-cpp"
    mean `llamacpp`), else a ValueError naming them."""
    text = str(value).strip().lower()
    if name == "backend":
        text = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "llama_cpp": "llamacpp"}.get(text, text)
    if text not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return text


def is_openai_host(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host == "api.openai.com" or any(host.endswith(h) for h in _OPENAI_HOSTS)


def identify_backend(models: Optional[Mapping], base_url: str, openapi_title: Optional[str] = None) -> str:
    """The backend of a server from its `GET /v1/models` JSON (and, when given, the title of its
    `/openapi.json`): `llamacpp`, `vllm`, `openai` or `plain` (not recognised).

    Example:
        >>> from reflectune_hf.oracles.backends import identify_backend
        >>> identify_backend({"data": [{"id": "m", "owned_by": "me"}]}, "http://h/v1", "🦙 llama.cpp Python API")
        'llamacpp'
        >>> identify_backend({"data": [{"id": "m", "owned_by": "library"}]}, "http://h/v1")
        'plain'
    """
    if is_openai_host(base_url):
        return "openai"
    owners = set()
    for item in (models or {}).get("data") or [] if isinstance(models, Mapping) else []:
        if isinstance(item, Mapping):
            owners.add(str(item.get("owned_by", "")).lower())
    if "vllm" in owners:
        return "vllm"
    if "llamacpp" in owners or "llama.cpp" in owners or "llama.cpp" in (openapi_title or "").lower():
        return "llamacpp"
    if owners & {"openai", "system", "openai-internal"}:
        return "openai"
    return "plain"


def _version(text: str) -> Optional[tuple]:
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x or 0) for x in match.groups()) if match else None


def vllm_fields_for(version: Optional[str]) -> str:
    """`structured_outputs` for vLLM >= 0.10.2 or an unknown version, else `guided`.

    Example:
        >>> from reflectune_hf.oracles.backends import vllm_fields_for
        >>> vllm_fields_for("0.8.5"), vllm_fields_for("0.11.0"), vllm_fields_for(None)
        ('guided', 'structured_outputs', 'structured_outputs')
    """
    parsed = _version(version) if version else None
    return "guided" if parsed is not None and parsed < VLLM_STRUCTURED_OUTPUTS_SINCE else "structured_outputs"


@dataclass(frozen=True)
class Detected:
    """What `detect_backend` found: the backend and, for vLLM, its version (or None)."""

    backend: str
    version: Optional[str] = None


def _get_json(url: str, api_key: Optional[str], timeout: float, auth: Optional[tuple] = None) -> Optional[Any]:
    """GET `url` as JSON; None when the server has no such route (404, 405, 410) or the body is no
    JSON. Connection errors raise, and so does any other HTTP error (a 503 while the server loads
    its model, a 401, a 429): the server did not answer now, which is not an answer to remember.
    `auth`: `(user, password)` sent as HTTP basic auth (as the oracle's own client sends them)."""
    headers = {"Accept": "application/json"}
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as err:
        if err.code in (404, 405, 410):
            return None
        raise
    except ValueError:
        return None


_DETECTED: dict[str, Detected] = {}
_NOTED: set = set()


def cached_detection(base_url: str) -> Optional[Detected]:
    """What `detect_backend` found for `base_url` in this process (OpenAI's own hosts need no
    probe), or None when not asked yet."""
    if is_openai_host(base_url):
        return Detected("openai")
    return _DETECTED.get(base_url.rstrip("/"))


def forget_detections() -> None:
    """Forget every recognised server and logged note of this process (a server was replaced)."""
    _DETECTED.clear()
    _NOTED.clear()


def note_plain_once(base_url: str, why: str) -> None:
    """Log, once per process and server, that its answers are free text (the stages re-ask)."""
    if base_url not in _NOTED:
        _NOTED.add(base_url)
        logger.warning("Structured output is off for %s (%s): answers are free text, parsed as such; the "
                       "stages re-ask when the format is missed. Pass backend=... to override.",
                       redact_url(base_url), why)


def detect_backend(base_url: str, api_key: Optional[str] = None, timeout: float = 10.0,
                   auth: Optional[tuple] = None) -> Optional[Detected]:
    """Recognise the server at `base_url` (cached per process and URL); None when it did not
    answer: unreachable, or an HTTP error other than a missing route, e.g. a 503 while it loads its
    model (nothing is cached then: the next call asks again; the oracle reports the unreachable
    server itself).

    Reads `GET {base_url}/models`; for a server not recognised by `owned_by`, the title of
    `GET {root}/openapi.json` (llama-cpp-python's server); for vLLM, `GET {root}/version`.
    """
    base_url = base_url.rstrip("/")
    if base_url in _DETECTED:
        return _DETECTED[base_url]
    if is_openai_host(base_url):
        found = Detected("openai")
    else:
        root = re.sub(r"/v1$", "", base_url)
        try:
            models = _get_json(f"{base_url}/models", api_key, timeout, auth)
            backend = identify_backend(models, base_url)
            if backend == "plain":
                spec = _get_json(f"{root}/openapi.json", api_key, timeout, auth)
                info = spec.get("info") if isinstance(spec, dict) else None
                title = str(info.get("title") or "") if isinstance(info, dict) else None
                backend = identify_backend(models, base_url, title)
            version = None
            if backend == "vllm":
                info = _get_json(f"{root}/version", api_key, timeout, auth)
                version = str(info.get("version")) if isinstance(info, dict) and info.get("version") else None
        except (OSError, urllib.error.URLError, http.client.HTTPException) as err:  # no HTTP, or a body cut
            logger.debug("backend detection: %s did not answer (%s)", redact_url(base_url), err)
            return None
        found = Detected(backend, version)
    logger.info("Oracle server %s recognised as %s%s", redact_url(base_url), found.backend,
                f" {found.version}" if found.version else "")
    _DETECTED[base_url] = found
    return found


def structured_fields(shape: AnswerFormat, backend: str, vllm_fields: str = "structured_outputs",
                      vllm_format: str = "regex") -> tuple[dict, bool]:
    """(request body fields enforcing `shape` on `backend`, whether the answer is JSON to turn back
    with `shape.from_json`). `plain` gives `({}, False)`.

    Example:
        >>> from reflectune_hf.oracles.backends import structured_fields
        >>> from reflectune_hf.oracles.structured import ScoreLine
        >>> fields, is_json = structured_fields(ScoreLine(100), "openai")
        >>> fields["response_format"]["type"], fields["response_format"]["json_schema"]["strict"], is_json
        ('json_schema', True, True)
    """
    if backend == "llamacpp":
        return {"grammar": shape.gbnf()}, False
    if backend == "vllm":
        if vllm_fields == "auto":
            vllm_fields = "structured_outputs"
        if vllm_format == "json":
            schema = shape.json_schema(bounded=True)
            return ({"structured_outputs": {"json": schema}} if vllm_fields == "structured_outputs"
                    else {"guided_json": schema}), True
        regex = shape.regex()
        return ({"structured_outputs": {"regex": regex}} if vllm_fields == "structured_outputs"
                else {"guided_regex": regex}), False
    if backend == "openai":
        return {"response_format": {"type": "json_schema", "json_schema": {
            "name": shape.kind, "strict": True, "schema": shape.json_schema(bounded=False)}}}, True
    return {}, False


_FENCE_RE = re.compile(r"\A\s*```[ \t]*(?:json)?[ \t]*\n(.*)\n[ \t]*```\s*\Z", re.S | re.I)


def decode_answer(shape: AnswerFormat, text: str) -> str:
    """The canonical marker text of a JSON answer. An answer that is no JSON of the shape goes to
    the stage's parser (and re-ask) as the text it holds: a JSON object's values decoded, one a
    line (the parser must not read `\\"`, `\\n` or `\\u00e9` escapes as text), anything else
    (cut by `max_tokens`, say) as it came. JSON in a markdown fence (a server that does not enforce
    the schema itself may wrap it) is read as the JSON inside.

    Example:
        >>> import json
        >>> from reflectune_hf.oracles.backends import decode_answer
        >>> from reflectune_hf.oracles.structured import Field, MarkedFields
        >>> shape = MarkedFields((Field("Better Answer", 100),))
        >>> print(decode_answer(shape, json.dumps({"better_answer": '[Better Answer] "Hi" [End]\\nBye'})))
        [Better Answer] "Hi" [End]
        Bye
    """
    fenced = _FENCE_RE.match(text)
    inner = fenced.group(1) if fenced else text
    try:
        return shape.from_json(inner)
    except ValueError as err:
        logger.debug("structured answer not of its shape, parsed as text: %s", err)
    try:
        data = json.loads(inner)
    except (TypeError, ValueError):
        return text
    if isinstance(data, dict):
        return "\n".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in data.values())
    return data if isinstance(data, str) else text


class StructuredOutput:
    """Mixin of the OpenAI-compatible oracles: the `backend` / `structured` / `vllm_*` settings,
    the body fields of a request's `answer_format`, and JSON answers turned back into marker text.

    The host class has `base_url`, `timeout` and `_api_key` (a `Secret` or None).
    `fixed_backend`: a wire format that `backend="auto"` means without probing (the Batch API).
    """

    fixed_backend: Optional[str] = None

    def _set_structured(self, backend: str, structured, vllm_fields: str, vllm_format: str) -> None:
        self.backend = check_choice("backend", backend, BACKENDS)
        self.structured = structured_mode(structured)
        self.vllm_fields = check_choice("vllm_fields", vllm_fields, VLLM_FIELDS)
        self.vllm_format = check_choice("vllm_format", vllm_format, VLLM_FORMATS)
        if self.structured == "on" and self.backend == "plain":
            raise ValueError("structured='on' needs a backend that enforces a format; backend='plain' cannot "
                             "(use structured='auto' or a backend among llamacpp, vllm, openai)")

    def _prepare(self, request):
        if getattr(self, "structured", "auto") == "off" and request.answer_format is not None:
            return replace(request, answer_format=None)  # today's request, today's cache key
        return super()._prepare(request)

    def _backend_now(self) -> tuple[str, str]:
        """(backend, vLLM fields) of this process: the setting, else what was detected."""
        backend, version = self.backend, None
        if backend == "auto":
            found = Detected(self.fixed_backend) if self.fixed_backend else cached_detection(self.base_url)
            backend, version = (found.backend, found.version) if found is not None else ("plain", None)
        fields = self.vllm_fields if self.vllm_fields != "auto" else vllm_fields_for(version)
        return backend, fields

    def served_backend(self) -> str:
        """The backend this oracle's structured requests go to in this process (`plain` when
        the server was not recognised, or not asked yet)."""
        return self._backend_now()[0]

    def _detect_backend(self, requests) -> None:
        """Before sending shaped requests: recognise the server (once per process) and check that
        the structured mode can be honoured; one logged note when answers will be free text."""
        if self.structured == "off" or all(r.answer_format is None for r in requests):
            return
        probed = True
        if self.backend == "auto" and not self.fixed_backend and cached_detection(self.base_url) is None:
            key = self._api_key.value if self._api_key is not None else os.environ.get("OPENAI_API_KEY")
            probed = detect_backend(self.base_url, key, timeout=min(self.timeout, 10.0),
                                    auth=getattr(self, "auth", None)) is not None
        if self._backend_now()[0] != "plain":
            return
        # Not probed: no answer to GET /models (a server down fails its requests too; one that answers
        # chats only gets free text, said here, as for a server not recognised).
        why = ("backend='plain'" if self.backend == "plain"
               else "the server was not recognised as llama.cpp, vLLM or OpenAI" if probed
               else "the server did not answer GET /models (down, slow or an HTTP error), which recognises it")
        if self.structured == "on":
            raise OracleConfigurationError(
                f"structured='on' but {redact_url(self.base_url)} cannot enforce an answer format ({why}); pass "
                "backend='llamacpp', 'vllm' or 'openai' if it is one of those, or structured='auto'")
        note_plain_once(self.base_url, why)

    def _structured(self, request) -> tuple[dict, bool]:
        """(body fields enforcing the request's answer_format, whether the answer is JSON)."""
        if request.answer_format is None or self.structured == "off":
            return {}, False
        backend, fields = self._backend_now()
        return structured_fields(request.answer_format, backend, fields, self.vllm_format)

    def _decode(self, request, text: str) -> str:
        """The answer as the stage parses it: a JSON answer turned back into the marker text."""
        if request.answer_format is not None and text and self._structured(request)[1]:
            return decode_answer(request.answer_format, text)
        return text
