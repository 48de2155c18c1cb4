"""scripts/bench_oracle.py runs end to end and prints the promised JSON line (tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO


def test_bench_prints_one_json_line_with_both_rates():
    cmd = [sys.executable, str(REPO / "scripts" / "bench_oracle.py"), "--latency", "0.02", "--jitter", "0.005",
           "--error_rate", "0.05", "--retry_after", "0.1", "--requests", "64", "--reference_requests", "30",
           "--reference_wait", "0.05"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    [line] = out.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["bound_rps"] == 32 / 0.02 and report["ours_failed_rows"] == 0
    assert report["ours_rps"] > 0 and report["reference_rps"] > 0
    assert report["ratio_vs_bound"] == pytest.approx(report["ours_rps"] / report["bound_rps"], abs=2e-3)
    assert report["ratio_vs_reference"] == pytest.approx(report["ours_rps"] / report["reference_rps"], abs=2e-2)
