"""`LlamaCppOracle`'s default thread count follows the machine's free cores (llama.cpp's workers
spin while they wait: a thread on a core another process holds slows every decode step)."""

import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("llama_cpp")

from reflectune_hf.oracles import ChatRequest, LlamaCppOracle  # noqa: E402
from reflectune_hf.oracles import cpu_threads  # noqa: E402
from reflectune_hf.oracles.cpu_threads import busy_cores, default_threads  # noqa: E402


@pytest.mark.parametrize("usable, busy, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 9.0, 1), (16, 3.4, 13), (1, 0.0, 1), (4, 40.0, 1)])
def test_default_threads_are_the_free_usable_cores(usable, busy, expected):
    assert default_threads(usable=usable, busy=busy) == expected


def test_this_process_earlier_work_does_not_take_a_core(monkeypatch):
    """Right after this process converted a model (CPU-heavy), the 1-minute load average reads as
    a busy core although the machine is now idle: the oracle took 1 thread of 2 for the whole
    quickstart. The thread count follows what other work keeps busy now, not the load average;
    the load average is the fallback where /proc/stat cannot be read."""
    monkeypatch.setattr(os, "getloadavg", lambda: (1.6, 0.9, 0.4))  # what the conversion leaves
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.1)  # nothing else runs now
    assert default_threads(usable=2) == 2
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: None)  # no /proc/stat
    assert default_threads(usable=2) == 1


def test_busy_cores_sees_another_process_on_a_cpu(monkeypatch):
    cpu = min(os.sched_getaffinity(0))
    spin = ("import os, time\nos.sched_setaffinity(0, {%d})\nend = time.time() + 20\n"
            "while time.time() < end:\n    pass\n" % cpu)
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        assert busy_cores({cpu}, seconds=0.5) >= 0.6
    finally:
        child.kill()
        child.wait()
    monkeypatch.setattr(cpu_threads, "PROC_STAT", "/nonexistent/stat")
    assert busy_cores({cpu}, seconds=0.01) is None


def test_busy_cores_does_not_count_this_process_own_threads():
    """A thread of ours busy on a CPU (an OpenMP pool still spinning after a torch op, a
    conversion finishing) is not other work: counted, the oracle halved its threads for a whole
    run on an idle 2-core machine."""
    import threading

    cpu = min(os.sched_getaffinity(0))
    started, stop = threading.Event(), threading.Event()

    def spin():
        os.sched_setaffinity(threading.get_native_id(), {cpu})
        started.set()
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        started.wait(5)
        time.sleep(0.2)
        assert busy_cores({cpu}, seconds=0.5) < 0.4
    finally:
        stop.set()
        spinner.join()


def test_an_oracle_without_n_threads_takes_the_free_cores(monkeypatch):
    usable = len(os.sched_getaffinity(0))
    ask = [ChatRequest([{"role": "user", "content": "Say hi."}], max_tokens=2)]
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.0)  # an idle machine
    idle = LlamaCppOracle(batch_size=1, n_ctx=256, cache=False, progress=False)
    assert idle.complete(ask)[0].ok and idle._engine.n_threads == usable
    idle.close()
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: float(usable) + 3)  # every core taken
    busy = LlamaCppOracle(batch_size=1, n_ctx=256, cache=False, progress=False)
    assert busy.complete(ask)[0].ok and busy._engine.n_threads == 1
    busy.close()
    pinned = LlamaCppOracle(batch_size=1, n_ctx=256, n_threads=1, cache=False, progress=False)
    assert pinned.complete(ask)[0].ok and pinned._engine.n_threads == 1
    pinned.close()
