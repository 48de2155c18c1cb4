"""How many threads llama.cpp should take here: the usable cores (`os.sched_getaffinity`) minus
those other work keeps busy now, read from /proc/stat over a quarter second (`busy_cores`), so
a machine's other jobs are not slowed, nor our own decode by threads that spin on a taken core.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

PROC_STAT = "/proc/stat"  # per-CPU time counters (Linux)


def _cpu_ticks(cpus: set) -> Optional[dict]:
    """`{cpu: (busy, idle)}` clock ticks of `cpus` from /proc/stat (steal counts as neither), or
    None where it cannot be read."""
    try:
        with open(PROC_STAT, encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    ticks = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in (values + ["0"] * 7)[:7])
            ticks[int(name[3:])] = (user + nice + system + irq + softirq, idle + iowait)
    return ticks or None


def busy_cores(cpus=None, seconds: float = 0.25) -> Optional[float]:
    """How many of `cpus` (default: the usable ones) other work keeps busy: the busy share of each
    CPU over the next `seconds` (from /proc/stat, while this thread sleeps), summed, less the
    cores this process's own threads used meanwhile (`time.process_time`: a pool of ours still
    spinning after a torch op is not another job). Unlike the load average, it does not count
    this process's earlier work (right after a model conversion in the same process the 1-minute
    load reads as a busy core). None without /proc/stat.

    Example:
        >>> from reflectune_hf.oracles.cpu_threads import busy_cores
        >>> 0 <= busy_cores(seconds=0.05) <= len(os.sched_getaffinity(0))
        True
    """
    cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
    before = _cpu_ticks(cpus)
    if before is None:
        return None
    wall, own = time.monotonic(), time.process_time()
    time.sleep(seconds)
    after = _cpu_ticks(cpus) or {}
    own_cores = (time.process_time() - own) / max(time.monotonic() - wall, 1e-9)
    total = 0.0
    for cpu, (busy, idle) in before.items():
        busy_after, idle_after = after.get(cpu, (busy, idle))
        counted = (busy_after - busy) + (idle_after - idle)
        total += (busy_after - busy) / counted if counted > 0 else 0.0
    return max(0.0, total - own_cores)


def default_threads(usable: Optional[int] = None, busy: Optional[float] = None) -> int:
    """llama.cpp threads for a new engine: the usable cores (`os.sched_getaffinity`) minus those
    other work keeps busy (`busy`, default `busy_cores()`, or the 1-minute load average where
    /proc/stat cannot be read), rounded, at least 1. llama.cpp's workers spin while they wait, so
    a thread on a core that another process holds slows every step.

    Example:
        >>> from reflectune_hf.oracles.cpu_threads import default_threads
        >>> (default_threads(usable=2, busy=0.4), default_threads(usable=2, busy=0.8),
        ...  default_threads(usable=16, busy=3.4))
        (2, 1, 13)
    """
    usable = len(os.sched_getaffinity(0)) if usable is None else int(usable)
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # no load average on this platform
            busy = 0.0
    return max(1, min(usable, usable - math.floor(busy + 0.5)))
