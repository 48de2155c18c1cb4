"""scripts/bench_local_oracle.py runs end to end on tiny settings: one JSON line, every engine on
the threads the default oracle takes, its step sections timed through the public API."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO

torch = pytest.importorskip("torch")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench_local_oracle

    threads = torch.get_num_threads()  # the script sets torch's threads process-wide: give them back
    yield bench_local_oracle
    torch.set_num_threads(threads)
    sys.modules.pop("bench_local_oracle", None)


def test_the_local_oracle_bench_prints_one_line_on_the_oracles_default_threads(bench, monkeypatch, capsys):
    from reflectune_hf.oracles import cpu_threads, llamacpp_engine, llamacpp_local

    if not llamacpp_local.llamacpp_available():
        pytest.skip("llama-cpp-python is not installed (the `server` extra)")
    # A machine where other work keeps one core busy: the oracle takes the other one, and so does
    # every engine of the benchmark (it took torch's thread count, all cores, before).
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda *a, **k: 1.0)
    # Every run prefills its prompts: the runs send the same prompts, and one that started from
    # the prompts an earlier run kept would compare decoding with a prefill against one without.
    restored = []
    monkeypatch.setattr(llamacpp_engine.LlamaEngine, "restore", lambda self, *a: restored.append(a) or False)
    report = bench.main(["--rows", "1", "--max_new_tokens", "6", "--skip", "generate", "llamacpp"])
    [line] = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line) == report
    assert report["oracle"] == "LlamaCppOracle" and report["prompts"] == 2
    assert report["threads"] == cpu_threads.default_threads(busy=1.0) and restored == []
    assert 0 < report["oracle_tokens"] <= 12 and report["oracle_tps"] > 0
    sections = report["constrained_ms_per_step"]
    assert sections["steps"] > 0 and set(sections) > {"steps", "rows"}
    assert report["constrained_tokens"] > 0 and 0 < report["constrained_overhead_sections"]
