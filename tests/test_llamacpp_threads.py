"""`LlamaCppOracle`'s default thread count follows the machine's free cores (llama.cpp's workers
spin while they wait: a thread on a core another process holds slows every decode step)."""

import os

import pytest

pytest.importorskip("llama_cpp")

from reflectune_hf.oracles import ChatRequest, LlamaCppOracle  # noqa: E402
from reflectune_hf.oracles.llamacpp_local import default_threads  # noqa: E402


@pytest.mark.parametrize("usable, load, expected", [
    (2, 0.0, 2), (2, 0.9, 2), (2, 1.2, 1), (2, 9.0, 1), (16, 3.5, 13), (1, 0.0, 1), (4, 40.0, 1)])
def test_default_threads_are_the_free_usable_cores(usable, load, expected):
    assert default_threads(usable=usable, load=load) == expected


def test_an_oracle_without_n_threads_takes_the_free_cores(monkeypatch):
    usable = len(os.sched_getaffinity(0))
    ask = [ChatRequest([{"role": "user", "content": "Say hi."}], max_tokens=2)]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
    idle = LlamaCppOracle(batch_size=1, n_ctx=256, cache=False, progress=False)
    assert idle.complete(ask)[0].ok and idle._engine.n_threads == usable
    idle.close()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(usable) + 3, 0.0, 0.0))  # every core taken
    busy = LlamaCppOracle(batch_size=1, n_ctx=256, cache=False, progress=False)
    assert busy.complete(ask)[0].ok and busy._engine.n_threads == 1
    busy.close()
    pinned = LlamaCppOracle(batch_size=1, n_ctx=256, n_threads=1, cache=False, progress=False)
    assert pinned.complete(ask)[0].ok and pinned._engine.n_threads == 1
    pinned.close()
