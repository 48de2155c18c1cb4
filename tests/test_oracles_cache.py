"""OracleCache: one row per success, keyed on the server, safe with several writing processes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from conftest import REPO

from reflectune_hf.oracles import ChatRequest, ChatResult, OracleCache
from reflectune_hf.oracles.cache import redact_url, resolve_cache

REQ = ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=8)


def test_roundtrip_and_only_successes(tmp_path):
    cache = OracleCache(tmp_path / "c.sqlite")
    key = REQ.key("m", "http://a/v1")
    result = ChatResult(texts=["Hello"], finish_reasons=["stop"], usage={"prompt_tokens": 3},
                        logprobs=[[{"token": "Hello", "logprob": -0.1, "top_logprobs": []}]])
    cache.put(key, result, request=REQ, model="m", base_url="http://user:pw@a/v1")
    got = cache.get(key)
    assert got.cached and got.texts == ["Hello"] and got.logprobs == result.logprobs
    assert got.usage == {"prompt_tokens": 3} and got.error is None
    assert key in cache and len(cache) == 1 and cache.get("missing") is None
    assert cache.execute("SELECT base_url FROM responses")[0][0] == "http://a/v1"  # credentials never stored
    with pytest.raises(ValueError, match="only successful"):
        cache.put("k2", ChatResult.failure("boom"))
    assert REQ.key("m", "http://b/v1") != key  # the server is part of the key
    cache.delete([key])
    assert len(cache) == 0
    state = pickle.loads(pickle.dumps(cache)).__dict__
    assert state == {"path": cache.path, "_conn": None, "_pid": None, "_lock": None}  # the path only


def test_default_path_and_settings(tmp_path, monkeypatch):
    assert OracleCache().path == os.environ["REFLECTUNE_HF_ORACLE_CACHE"]
    monkeypatch.delenv("REFLECTUNE_HF_ORACLE_CACHE")
    monkeypatch.setenv("REFLECTUNE_HF_CACHE", str(tmp_path / "root"))
    assert OracleCache().path == str(tmp_path / "root" / "oracle.sqlite")
    assert resolve_cache(False) is None and resolve_cache(str(tmp_path / "x.sqlite")).path.endswith("x.sqlite")
    with pytest.raises(TypeError):
        resolve_cache(3)
    assert redact_url("https://u:p@host:8/v1") == "https://host:8/v1"


def test_oracle_messages_show_no_secret_query_parameter(tmp_path):
    """`redact_url` (the oracles' errors, logs, repr and stored URLs) kept `?api_key=...`."""
    from reflectune_hf.oracles import ChatRequest, OpenAIOracle, OracleConfigurationError

    assert redact_url("https://u:p@[::1]:8/v1?api_key=sk-9&region=eu") == "https://[::1]:8/v1?region=eu"
    oracle = OpenAIOracle("m", base_url="http://127.0.0.1:9/v1?api_key=sk-secret-9", api_key="x",
                          cache=str(tmp_path / "c.sqlite"), max_retries=0)
    assert "sk-secret-9" not in repr(oracle)
    with pytest.raises(OracleConfigurationError) as err:
        oracle.complete([ChatRequest([{"role": "user", "content": "Hi"}], max_tokens=4)])
    assert "127.0.0.1:9" in str(err.value) and "sk-secret-9" not in str(err.value)


WRITER = """
import sys
from reflectune_hf.oracles import ChatResult, OracleCache
cache = OracleCache(sys.argv[1])
for i in range(150):
    cache.put(f"{sys.argv[2]}-{i}", ChatResult(texts=[str(i)]))
    assert cache.get(f"{sys.argv[2]}-{i}").texts == [str(i)]
"""


def test_several_processes_write_at_once(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, name], env=env, stderr=subprocess.PIPE)
             for name in ("a", "b", "c")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    cache = OracleCache(path)
    assert len(cache) == 450
    assert cache.execute("PRAGMA journal_mode")[0][0] == "wal"


def test_a_cache_path_that_cannot_be_used_is_named_with_what_to_do(tmp_path, monkeypatch):
    """A folder as the oracle cache gave sqlite's bare `unable to open database file`; a file as
    `$REFLECTUNE_HF_CACHE` gave `FileExistsError`: neither named the setting."""
    from reflectune_hf.oracles.base import OracleConfigurationError
    from reflectune_hf.utils import cache_root

    monkeypatch.setenv("REFLECTUNE_HF_ORACLE_CACHE", str(tmp_path))
    with pytest.raises(OracleConfigurationError, match=r"Cannot open the oracle cache .*REFLECTUNE_HF_ORACLE_CACHE"):
        OracleCache().get_many(["k"])
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("REFLECTUNE_HF_CACHE", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match=r"\$REFLECTUNE_HF_CACHE=.*file cannot be a folder"):
        cache_root()


def test_a_damaged_cache_file_is_one_clear_error_naming_it(tmp_path):
    """A cache file damaged after it was opened once (a copy taken mid-write, a full disk) raised
    sqlite's bare `DatabaseError: database disk image is malformed` from the first lookup."""
    from reflectune_hf.oracles.base import OracleConfigurationError

    path = tmp_path / "c.sqlite"
    cache = OracleCache(path)
    keys = [f"key-{i}" for i in range(200)]
    cache.executemany("INSERT INTO responses VALUES (?,?,?,?,?,?)",
                      [(k, "m", "", None, '{"texts": ["%s"]}' % ("x" * 300), 0.0) for k in keys])
    cache.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    cache.close()
    data = bytearray(path.read_bytes())
    for page in range(2 * 4096, len(data), 4096):  # page 1 (the header and schema) stays readable
        data[page:page + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(OracleConfigurationError, match=r"oracle cache .*c\.sqlite is damaged.*cache=False"):
        OracleCache(path).get_many(keys)


def test_an_empty_oracle_cache_given_as_cache_is_used(tmp_path):
    """`cache=OracleCache(path)` on a new file was falsy (`len() == 0`): the oracle cached nothing,
    ever, and `OpenAIBatchOracle` refused it as "needs the cache"."""
    from loopback import LoopbackServer

    from reflectune_hf.oracles import OpenAIBatchOracle, OpenAIOracle

    cache = OracleCache(tmp_path / "new.sqlite")
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, cache=cache)
        assert oracle.complete([REQ])[0].text == "echo: Hi" and len(cache) == 1
        assert oracle.complete([REQ])[0].cached and len(server.chat_requests) == 1
    assert OpenAIBatchOracle("m", base_url="http://127.0.0.1:9/v1", cache=OracleCache(tmp_path / "b.sqlite")).cache


def test_a_cache_that_cannot_be_written_stops_the_run_with_a_clear_error(tmp_path):
    """A read-only (or full) cache file let the first answer's `put` raise sqlite's bare
    `OperationalError: attempt to write a readonly database`, naming no file, out of `complete`."""
    from loopback import LoopbackServer

    from reflectune_hf.oracles import OpenAIOracle
    from reflectune_hf.oracles.base import OracleConfigurationError

    cache = OracleCache(tmp_path / "ro.sqlite")
    cache.execute("PRAGMA query_only = 1")  # what a file this user cannot write does (root writes any file)
    with LoopbackServer() as server:
        oracle = OpenAIOracle("echo", base_url=server.base_url, cache=cache)
        with pytest.raises(OracleConfigurationError, match=r"Cannot write the oracle cache .*ro\.sqlite.*readonly"):
            oracle.complete([REQ])
