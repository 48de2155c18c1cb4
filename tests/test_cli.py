"""The `reflectune` command: subprocess runs, bad arguments, estimate, push, reflect on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import DatasetDict, load_from_disk

from reflectune_hf import cli
from reflectune_hf.oracles.loopback import LoopbackServer


def reflectune(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run `python -m reflectune_hf ...` (the console script's code) in a fresh process."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "reflectune_hf", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=full_env)


def test_help_lists_every_command():
    out = reflectune("--help")
    assert out.returncode == 0
    for name in ("recycle", "reflect", "score", "select", "estimate", "push", "sft", "eval"):
        assert f"  {name}" in out.stdout
    out = reflectune("recycle", "--help")
    assert out.returncode == 0 and "--oracle_model" in out.stdout and "--student_model" in out.stdout


@pytest.mark.parametrize("args, code, message", [
    (["nope"], 2, "unknown command 'nope'"),
    (["recycle", "--no_such_flag", "1"], 2, "no_such_flag"),
    (["recycle", "--limit", "many"], 2, "limit"),
    (["reflect", "--data", "sample"], 1, "--oracle_model is required"),
    (["reflect", "--data", "/no/such/file.jsonl", "--oracle_model", "m"], 1, "/no/such/file.jsonl"),
    (["select", "--data", "sample"], 1, "lacks the variant split"),
    (["push", "--data", "sample"], 1, "--push_to_hub"),
    (["recycle", "--config", "/no/such.yaml"], 2, "/no/such.yaml"),
])
def test_bad_arguments_exit_non_zero_with_a_clear_message(args, code, message, capsys):
    assert cli.main(args) == code
    captured = capsys.readouterr()
    assert message in captured.err + captured.out


def test_estimate_sends_nothing(tmp_path):
    config = tmp_path / "estimate.yaml"
    config.write_text(yaml.safe_dump({"data": "sample", "limit": 6, "oracle_model": "gpt-test", "input_price": 1.0,
                                      "output_price": 2.0, "max_new_tokens": 100}))
    with LoopbackServer() as server:
        out = reflectune("estimate", "--config", config, "--base_url", server.base_url, timeout=300)
        assert out.returncode == 0, out.stderr
        assert server.log == [], "estimate must not send anything"
    lines = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    rows_with_input = 2  # the first six sample rows: two have an input to compress
    assert int(lines["requests"]) == 6 * 3 + rows_with_input
    assert int(lines["output_tokens"]) == int(lines["requests"]) * 100
    expected_cost = (int(lines["prompt_tokens"]) * 1.0 + int(lines["output_tokens"]) * 2.0) / 1e6
    assert float(lines["cost"]) == pytest.approx(expected_cost)


def test_push_an_output_folder(tmp_path, monkeypatch, capsys):
    from datasets import Dataset
    from huggingface_hub import DatasetCard, HfApi

    from reflectune_hf import load_sample
    from reflectune_hf.hub import save_local

    save_local(load_sample(), tmp_path / "out", card_context={"oracle_model": "m", "api_key": "sk-secret"})
    (tmp_path / "out" / "reflectune_config.json").write_text(json.dumps({"oracle_model": "from-the-run"}))
    sent = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kw: sent.append(("data", repo_id, kw["private"])))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.append(("plots", kw["repo_id"])))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: sent.append(("card", str(self))))
    assert cli.main(["push", "--data", str(tmp_path / "out"), "--push_to_hub", "me/data", "--no_private"]) == 0
    assert sent[0] == ("data", "me/data", False) and sent[1] == ("plots", "me/data")
    assert "from-the-run" in sent[2][1] and "sk-secret" not in sent[2][1]
    assert "huggingface.co/datasets/me/data" in capsys.readouterr().out


@pytest.mark.server
@pytest.mark.slow
def test_reflect_against_the_server(llama_server, tmp_path):
    with LoopbackServer(upstream=llama_server.base_url) as proxy:
        out = reflectune("reflect", "--data", "sample", "--limit", 3, "--oracle_model", llama_server.model,
                         "--base_url", proxy.base_url, "--max_new_tokens", 24, "--format_retries", 0,
                         "--max_concurrency", 1, "--output_dir", tmp_path / "out")
        assert out.returncode == 0, out.stderr
        sent = len(proxy.chat_requests)
    variants = load_from_disk(str(tmp_path / "out" / "arrow"))
    assert isinstance(variants, DatasetDict) and set(variants) == {
        "origin", "reflect_instruction", "reflect_response", "reflect_both"}
    assert all(len(ds) == 3 and ds["id"] == [0, 1, 2] for ds in variants.values())
    assert sent >= 3 * 2  # instruction + response reflection per row, at least
    assert "reflect_both" in out.stdout and "written to" in out.stdout
    card = (tmp_path / "out" / "README.md").read_text()
    assert llama_server.model in card and "127.0.0.1" in card
