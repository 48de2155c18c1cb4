"""Shared fixtures: the real llama.cpp server, the sample, the shared data, the embedded model.

Markers (setup.cfg): `slow` for tests over ~30 s on 2 cores, `server` for tests that start the
real llama.cpp OpenAI-compatible server. CI runs every marker; `-m "not slow"` gives a quick
local loop.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Hermetic datasets cache for the whole session (subprocesses inherit it): a map cached by an
# earlier run must not hide the work a test expects to see. Set before `datasets` is imported.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="reflectune-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
if "datasets" in sys.modules:  # pragma: no cover - a plugin imported it first
    sys.modules["datasets"].config.HF_DATASETS_CACHE = _DATASETS_CACHE

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REFLECTUNE_SHARED", REPO.parent / "shared"))
SERVER_MODEL_ALIAS = "smollm2-135m-instruct"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LlamaServer:
    """A running `python -m llama_cpp.server` on loopback."""

    base_url: str  # ends with /v1, as OpenAI clients take it
    model: str  # the model name the server answers to
    port: int
    process: subprocess.Popen
    log_path: Path


def _die_with_parent() -> None:
    """In the server's child process: get SIGTERM when pytest dies, however it dies (Linux)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the session fixture's teardown still stops the server
        pass


def _wait_until_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama.cpp server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"llama.cpp server did not answer within {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


def start_llama_server(gguf: Path, log_path: Path, n_ctx: int = 4096, extra_args=()) -> LlamaServer:
    """Start the real llama.cpp server with `gguf` on a free loopback port and wait for it."""
    port = free_port()
    model_name = SERVER_MODEL_ALIAS
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf),
        "--model_alias", model_name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        # Generation on one thread, prompts on up to two: between two decodes ggml's extra worker
        # thread spin-waits, taking the core the sampler needs (the GBNF grammar and the
        # repetition penalties run over the whole 49k vocabulary per token). Measured on 2 busy
        # cores (load 7), one reflection answer of 36 tokens: 97 s with 2 threads, 14 s thus.
        "--n_threads", "1",
        "--n_threads_batch", str(max(1, min(2, os.cpu_count() or 1))),
        "--logits_all", "True",  # token logprobs in chat completions
        "--verbose", "False",
        *extra_args,
    ]
    log = open(log_path, "wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=_die_with_parent)
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}/v1/models", process, log_path)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return LlamaServer(f"http://127.0.0.1:{port}/v1", model_name, port, process, log_path)


def stop_llama_server(server: LlamaServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_oracle_cache(tmp_path, monkeypatch):
    """Each test gets its own oracle cache file; converted models stay in the shared cache root."""
    monkeypatch.setenv("REFLECTUNE_HF_ORACLE_CACHE", str(tmp_path / "oracle.sqlite"))


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """The real llama.cpp OpenAI-compatible server with the embedded SmolLM2 GGUF, for the session."""
    pytest.importorskip("llama_cpp", reason="the server extra is not installed: pip install -e '.[server]'")
    from reflectune_hf.models import gguf_path

    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    server = start_llama_server(gguf_path(SERVER_MODEL_ALIAS), log_path)
    yield server
    stop_llama_server(server)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted embedded SmolLM2 directory (converted once per cache root)."""
    from reflectune_hf.models import resolve_model

    return resolve_model(SERVER_MODEL_ALIAS)


@pytest.fixture
def sample():
    """The bundled 40-row sample with ids."""
    from reflectune_hf import load_sample

    return load_sample()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real Alpaca rows and reference outputs); skips when absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"{data} is absent (a fresh clone has no ../shared)")
    return data
