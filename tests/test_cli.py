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

from reflectune_hf.cli import main as cli

from reflectune_hf.cli import jobs as pipeline
from loopback import LoopbackServer


def reflectune(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """Run `python -m reflectune_hf ...` (the console script's code) in a fresh process."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "reflectune_hf", *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=full_env)


def test_help_lists_every_command():
    out = reflectune("--help")
    assert out.returncode == 0
    for name in ("recycle", "reflect", "score", "select", "estimate", "push", "sft", "tuna", "eval"):
        assert f"  {name}" in out.stdout
    out = reflectune("recycle", "--help")
    assert out.returncode == 0 and "--oracle_model" in out.stdout and "--student_model" in out.stdout


@pytest.mark.parametrize("args, code, message", [
    (["nope"], 2, "unknown command 'nope'"),
    (["recycle", "--no_such_flag", "1"], 2, "no_such_flag"),
    (["recycle", "--limit", "many"], 2, "limit"),
    (["reflect", "--data", "sample"], 2, "--oracle_model is required"),
    (["estimate", "--data", "sample"], 2, "--oracle_model is required"),
    (["reflect", "--data", "/no/such/file.jsonl", "--oracle_model", "m"], 1,
     "/no/such/file.jsonl: no such file or directory"),
    (["select", "--data", "sample"], 1, "lacks the variant split"),
    (["push", "--data", "."], 2, "--push_to_hub"),
    (["push", "--data", "no-such-folder", "--push_to_hub", "me/x"], 2, "no such folder"),  # was a Hub lookup
    (["push", "--data", "", "--push_to_hub", "me/x"], 2, "no such folder"),
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
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    from datasets import Dataset
    from huggingface_hub import DatasetCard, HfApi

    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    from reflectune_hf.evaluation.quality import quality_report

    save_local(load_sample(), tmp_path / "out", card_context={"oracle_model": "m", "api_key": "sk-secret"},
               quality=quality_report(load_sample(), coherence=False),
               run_record={"oracle_model": "from-the-run", "data": str(tmp_path / "rows.jsonl")})
    sent = []
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kw: sent.append(("data", repo_id, kw["private"])))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.append(("plots", kw["repo_id"])))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: sent.append(("card", str(self))))
    assert cli.main(["push", "--data", str(tmp_path / "out"), "--push_to_hub", "me/data", "--no_private"]) == 0
    assert sent[0] == ("data", "me/data", False) and sent[1] == ("plots", "me/data")
    assert "from-the-run" in sent[2][1] and "sk-secret" not in sent[2][1] and "### Data quality" in sent[2][1]
    assert "rows.jsonl (local file)" in sent[2][1] and str(tmp_path) not in sent[2][1]
    assert "huggingface.co/datasets/me/data" in capsys.readouterr().out


def test_a_hub_refusal_is_one_line(tmp_path, monkeypatch, capsys):
    """A push the Hub refuses (403) printed huggingface_hub's five-line message."""
    import httpx2
    from datasets import Dataset
    from huggingface_hub import HfApi
    from huggingface_hub.utils import hf_raise_for_status

    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    def refuse(self, repo_id, **kw):
        request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
        hf_raise_for_status(httpx2.Response(403, json={"error": "no rights under 'me'"}, request=request,
                                            headers={"X-Request-Id": "abc"}))

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    save_local(load_sample(), tmp_path / "out")
    monkeypatch.setattr(Dataset, "push_to_hub", refuse)
    monkeypatch.setattr(HfApi, "repo_exists", lambda self, repo_id, **kw: False)
    assert cli.main(["push", "--data", str(tmp_path / "out"), "--push_to_hub", "me/data"]) == 1
    err = capsys.readouterr().err
    line = err[err.index("reflectune push: error:"):]
    assert line.startswith("reflectune push: error: HfHubHTTPError: (Request ID: abc) 403 Forbidden")
    assert line.count("\n") == 1 and line.endswith("no rights under 'me'\n")


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


def _read_output(out_dir: Path) -> dict:
    data = load_from_disk(str(out_dir / "arrow"))
    return {name: ds.to_list() for name, ds in data.items()}


@pytest.mark.server
@pytest.mark.slow
def test_recycle_killed_then_rerun_completes_from_the_caches_with_the_same_output(llama_server, tmp_path):
    """A `recycle` killed (SIGKILL) mid-reflection, rerun with the same arguments, sends only what
    was never answered and writes what an uninterrupted run writes; a third run sends nothing."""
    import signal
    import time
    from collections import Counter

    from huggingface_hub import DatasetCard

    # One server URL (the cache keys on it); a request asked again gets the server's first answer,
    # so the clean and the resumed run see the same answers (see LoopbackServer's `replay`).
    with LoopbackServer(upstream=llama_server.base_url, replay=True) as proxy:
        args = ["recycle", "--data", "sample", "--limit", 4, "--oracle_model", llama_server.model,
                "--base_url", proxy.base_url, "--max_new_tokens", 32, "--format_retries", 0,
                "--max_concurrency", 1, "--max_length", 512, "--score_batch_size", 4]

        def caches(name: str) -> dict:  # the oracle cache and datasets' cache of one "machine"
            return {"REFLECTUNE_HF_ORACLE_CACHE": str(tmp_path / f"{name}.sqlite"),
                    "HF_DATASETS_CACHE": str(tmp_path / f"{name}-datasets")}

        clean = reflectune(*args, "--output_dir", tmp_path / "clean", env=caches("clean"))
        assert clean.returncode == 0, clean.stderr
        full = len(proxy.chat_requests)
        # At least an instruction and a response reflection per row; the response reflection of a pair whose
        # instruction reflection fell back is the same request as the original's, served by the cache.
        assert full >= 2 * 4

        proc = subprocess.Popen([sys.executable, "-m", "reflectune_hf", *map(str, args), "--output_dir",
                                 tmp_path / "resumed"], env=dict(os.environ, HF_HUB_OFFLINE="1", **caches("resume")),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(proxy.chat_requests) < full + 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        killed = len(proxy.chat_requests) - full
        assert 3 <= killed < full and not (tmp_path / "resumed" / "README.md").exists()

        resumed = reflectune(*args, "--output_dir", tmp_path / "resumed", env=caches("resume"))
        assert resumed.returncode == 0, resumed.stderr
        after_kill = proxy.chat_requests[full:]
        # Only the request in flight at the kill (max_concurrency 1) may be sent twice.
        assert full <= len(after_kill) <= full + 1
        assert sum(n - 1 for n in Counter(e["prompt"] for e in after_kill).values()) == len(after_kill) - full

        again = reflectune(*args, "--output_dir", tmp_path / "again", env=caches("resume"))
        assert again.returncode == 0, again.stderr
        assert len(proxy.chat_requests) == full + len(after_kill), "a finished run is served from the caches"
        # Every map of the third run came from datasets' cache: the student model was never loaded.
        assert "IFDScorer loading" in resumed.stderr and "IFDScorer loading" not in again.stderr

    expected = _read_output(tmp_path / "clean")
    assert set(expected) == {"origin", "reflect_instruction", "reflect_response", "reflect_both", "selected"}
    assert _read_output(tmp_path / "resumed") == expected
    assert _read_output(tmp_path / "again") == expected
    for split in ("origin", "reflect_both"):
        assert {"ifd", "rifd", "score_status", "reflection_status"} <= set(expected[split][0])
    card = DatasetCard.load(tmp_path / "resumed" / "README.md")
    assert llama_server.model in card.text and "127.0.0.1" in card.text
    assert sorted(p.name for p in (tmp_path / "resumed" / "plots").glob("*.png"))
    assert "reflect_both" in resumed.stdout and "selected" in resumed.stdout and "written to" in resumed.stdout


@pytest.mark.parametrize("flags, message", [
    (["--selection", "v3"], "selection must be one of ['none', 'v1', 'v2'], got 'v3'"),
    (["--ratio", "mean"], "ratio must be one of ['loss', 'ppl'], got 'mean'"),
    (["--template", "chatml"], "template must be one of"),
    (["--dtype", "int8"], "dtype must be one of"),
    (["--top_fraction", "2"], "top_fraction must be in (0, 1], got 2.0"),
    (["--prompt_set", "mine"], "prompt_set must be one of ['clean', 'paper'], got 'mine'"),
    (["--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--limit", "0"], "limit must be an integer >= 1, got 0"),
])
def test_bad_options_fail_before_any_oracle_call(flags, message, capsys):
    """Options are checked when the command line is read (exit 2), before the oracle is asked."""
    with LoopbackServer() as server:
        code = cli.main(["recycle", "--data", "sample", "--oracle_model", "m", "--base_url", server.base_url, *flags])
        assert server.log == []
    assert code == 2 and message in capsys.readouterr().err


def test_bad_option_in_a_subprocess_exits_2():
    out = reflectune("recycle", "--oracle_model", "m", "--selection", "v3")
    assert out.returncode == 2 and "selection must be one of" in out.stderr


def test_rows_that_cannot_be_recycled_fail_before_any_oracle_call(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Say hi.", "input": "", "output": "  "}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with LoopbackServer() as server:
        out = reflectune("recycle", "--data", tmp_path / "rows.jsonl", "--oracle_model", "m",
                         "--base_url", server.base_url, "--output_dir", tmp_path / "out")
        assert server.log == []
    assert out.returncode == 1 and "reflect: 1 of 2 rows cannot be recycled" in out.stderr
    assert "id=1: empty output" in out.stderr and "vicuna_sft" not in out.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_reflect_score_select_sft_one_step_at_a_time(tmp_path, capsys):
    """Each command reads the previous output folder: reflect (a loopback oracle), score (the
    embedded student), select (V2 and V1, the license the user gave in the card), sft (a few
    steps on a split of the result). The first and last run as the console script does, in new
    processes; score and select run in this one (`cli.main`, the same code): three fewer
    interpreter start-ups, and nothing here is about the process boundary."""
    from reflectune_hf.selection.select import VARIANT_SPLITS

    with LoopbackServer() as server:
        out = reflectune("reflect", "--data", "sample", "--limit", 4, "--oracle_model", "echo", "--base_url",
                         server.base_url, "--output_dir", tmp_path / "reflected", "--license", "cc-by-nc-4.0")
        assert out.returncode == 0, out.stderr
        assert len(server.chat_requests) >= 4 * 2
    code = cli.main(["score", "--data", str(tmp_path / "reflected"), "--output_dir", str(tmp_path / "scored"),
                     "--max_length", "256", "--template", "plain"])
    assert code == 0, capsys.readouterr().err[-3000:]
    scored = load_from_disk(str(tmp_path / "scored" / "arrow"))
    assert set(scored) == set(VARIANT_SPLITS) and all(len(ds) == 4 for ds in scored.values())
    assert all(s in ("ok",) or s.startswith("no_scored_token") for ds in scored.values() for s in ds["score_status"])
    for selection in ("v2", "v1"):
        capsys.readouterr()
        code = cli.main(["select", "--data", str(tmp_path / "scored"), "--selection", selection, "--license", "mit",
                         "--output_dir", str(tmp_path / f"selected-{selection}")])
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        selected = load_from_disk(str(tmp_path / f"selected-{selection}" / "arrow"))["selected"]
        assert "selected" in out.out
        if selection == "v1":
            assert selected["id"] == scored["reflect_both"]["id"]
        card = (tmp_path / f"selected-{selection}" / "README.md").read_text()
        assert "license: mit" in card
    assert "license: cc-by-nc-4.0" in (tmp_path / "reflected" / "README.md").read_text()

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "scripts" / "configs" / "smoke_cpu.yaml").read_text())
    recipe.pop("datasets")
    recipe.update(dataset_name=str(tmp_path / "selected-v1"), output_dir=str(tmp_path / "sft"), max_steps=1,
                  gradient_accumulation_steps=1)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    out = reflectune("sft", "--config", tmp_path / "sft.yaml", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "sft" / "model.safetensors").is_file() and (tmp_path / "sft" / "chat_template.jinja").is_file()


@pytest.mark.slow
def test_recycle_with_a_local_oracle(tmp_path):
    """`local:<model>` runs the embedded SmolLM2 here as the oracle (what the quickstart does)."""
    out = reflectune("recycle", "--data", "sample", "--limit", 2, "--oracle_model", "local:smollm2-135m-instruct",
                     "--max_new_tokens", 16, "--format_retries", 0, "--max_length", 256,
                     "--output_dir", tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    data = load_from_disk(str(tmp_path / "out" / "arrow"))
    assert {"origin", "reflect_both", "selected"} <= set(data) and len(data["origin"]) == 2
    assert all(s for s in data["reflect_both"]["reflection_status"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["splits"]["origin"]["rows"] == 2
    assert "smollm2-135m-instruct" in (tmp_path / "out" / "README.md").read_text()


def test_card_license_comes_from_the_flag_or_the_loaded_data():
    from datasets import Dataset, DatasetInfo

    from reflectune_hf.cli.jobs import RecycleConfig, card_context

    data = Dataset.from_dict({"instruction": ["a"], "output": ["b"]}, info=DatasetInfo(license="cc-by-4.0"))
    assert card_context(RecycleConfig(oracle_model="m"), data=data)["license"] == "cc-by-4.0"
    assert card_context(RecycleConfig(oracle_model="m", license="mit"), data=data)["license"] == "mit"
    assert "license" not in card_context(RecycleConfig(oracle_model="m"), data=Dataset.from_dict({"a": [1]}))


def test_closing_table_counts_each_split_once():
    from datasets import Dataset

    from reflectune_hf.cli.jobs import JobResult, _result

    origin = Dataset.from_dict({"id": [0, 1], "reflection_status": ["", ""], "score_status": ["ok", "empty_output"]})
    both = Dataset.from_dict({"id": [0, 1], "reflection_status": ["ok", "failed"]})
    result = _result(DatasetDict({"origin": origin, "reflect_both": both, "selected": both.select([0])}),
                     Path("out"), both.select([0]), None, 0.0)
    assert isinstance(result, JobResult)
    lines = result.table().splitlines()
    # reflection_status is empty in origin: its score_status, named (an "ok" there is no reflection's)
    assert lines[1].split() == ["origin", "2", "score_status", "ok:", "1,", "empty_output:", "1"]
    assert lines[2].split() == ["reflect_both", "2", "reflection_status", "ok:", "1,", "failed:", "1"]
    assert [line.split()[0] for line in lines].count("selected") == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_credentials_in_base_url_reach_the_server_and_nothing_else(tmp_path, verbose):
    """`--base_url http://user:key@host/v1`: the server gets the credentials (HTTP basic auth, as
    the HTTP library sends a URL's userinfo), while stdout, stderr (also with -v), the output
    folder and the oracle cache hold neither them nor the API key."""
    import base64

    secrets = ["sekrit", base64.b64encode(b"user:sekrit").decode(), "sk-bearer-LEAKCHECK"]
    with LoopbackServer(basic_auth=("user", "sekrit")) as server:
        url = server.base_url.replace("http://", "http://user:sekrit@")
        out = reflectune("reflect", "--data", "sample", "--limit", 2, "--oracle_model", "echo", "--base_url", url,
                         "--format_retries", 0, "--output_dir", tmp_path / "out", *(["-v"] if verbose else []),
                         env={"OPENAI_API_KEY": "sk-bearer-LEAKCHECK"})
        assert out.returncode == 0, out.stderr[-3000:]
        assert len(server.chat_requests) >= 2 * 2  # every request was authorised: a 401 fails the command
    assert "127.0.0.1" in out.stderr + out.stdout or not verbose
    cache = Path(os.environ["REFLECTUNE_HF_ORACLE_CACHE"])
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] + list(cache.parent.glob(cache.name + "*"))
    assert any(p.name == "README.md" for p in files) and any(p.name.startswith(cache.name) for p in files)
    for secret in secrets:
        assert secret not in out.stdout and secret not in out.stderr, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)
    assert "HTTP Request:" not in out.stderr or verbose  # the per-request log is off by default


@pytest.mark.parametrize("command", ["reflect", "recycle"])  # estimate sends nothing: test_cli_help checks it refuses them
def test_oracle_client_options_are_flags_and_yaml_keys_and_reach_the_oracle(command, tmp_path):
    from trl import TrlParser

    from reflectune_hf.oracles import OpenAIBatchOracle, OpenAIOracle

    config_type = cli.JOBS[command][0]
    parser = TrlParser((config_type,))
    (config,) = parser.parse_args_and_config(["--oracle_model", "m", "--base_url", "http://127.0.0.1:9/v1",
                                              "--timeout", "3.5", "--max-retries", "2", "--context_window", "4096",
                                              "--context_tokenizer", "smollm2-135m-instruct"])
    oracle = pipeline.config_oracle(config)
    assert isinstance(oracle, OpenAIOracle) and (oracle.timeout, oracle.max_retries) == (3.5, 2)
    assert oracle.context_window == 4096 and oracle.prompt_counter.tokenizer == "smollm2-135m-instruct"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"oracle_model": "m", "timeout": 7.0, "max_retries": 0, "context_window": 2048}))
    (config,) = parser.parse_args_and_config(["--config", str(recipe)])
    oracle = pipeline.config_oracle(config)
    assert (oracle.timeout, oracle.max_retries, oracle.context_window) == (7.0, 0, 2048)
    assert oracle.prompt_counter.tokenizer is None
    with pytest.raises(ValueError, match="--context_window applies to online requests"):  # Batch would ignore it
        parser.parse_args_and_config(["--config", str(recipe), "--max_retries", "4", "--batch_api"])
    recipe.write_text(yaml.safe_dump({"oracle_model": "m", "timeout": 7.0, "max_retries": 0}))
    parser = TrlParser((config_type,))  # TrlParser keeps an earlier --config's values as its defaults
    (config,) = parser.parse_args_and_config(["--config", str(recipe), "--max_retries", "4", "--batch_api"])
    oracle = pipeline.config_oracle(config)
    assert isinstance(oracle, OpenAIBatchOracle) and (oracle.timeout, oracle.max_retries) == (7.0, 4)
    defaults = config_type(oracle_model="m")
    assert (defaults.timeout, defaults.max_retries, defaults.context_window) == (120.0, 6, None)


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "0"], "timeout must be a number > 0, got 0.0"),
    (["--max_retries", "-1"], "max_retries must be an integer >= 0, got -1"),
    (["--context_window", "0"], "context_window must be an integer >= 1, got 0"),
])
def test_bad_oracle_client_options_exit_2(flags, message, capsys):
    with LoopbackServer() as server:
        code = cli.main(["reflect", "--data", "sample", "--oracle_model", "m", "--base_url", server.base_url, *flags])
        assert server.log == []
    assert code == 2 and message in capsys.readouterr().err


def test_timeout_and_max_retries_flags_bound_a_hanging_server(tmp_path):
    """`--timeout 0.5 --max_retries 1` against a server that never answers in time: every request
    is tried twice (the response reflection of a pair whose instruction reflection failed is sent
    again by the reflect_both stage: twice twice), its row fails with the timeout, and the command
    ends (not after 2 x 120 s)."""
    from collections import Counter

    with LoopbackServer(faults=lambda prompt, attempt: "slow", slow_seconds=1.5) as server:
        out = reflectune("reflect", "--data", "sample", "--limit", 2, "--oracle_model", "echo", "--base_url",
                         server.base_url, "--timeout", 0.5, "--max_retries", 1, "--compress", "false",
                         "--format_retries", 0, "--output_dir", tmp_path / "out", timeout=300)
        attempts = Counter(e["prompt"] for e in server.chat_requests)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(attempts) == 2 * 2 and set(attempts.values()) <= {2, 4}
    assert "timeout: no answer within 0.5 s after 1 retries" in out.stderr


def test_eval_and_tuna_take_the_same_client_options():
    from reflectune_hf.cli import eval_job as eval_run
    from reflectune_hf.cli import tuna_job as tuna
    from reflectune_hf.oracles import OpenAIOracle

    (config,) = eval_run.make_parser().parse_args_and_config(
        ["--responses_a", "a.jsonl", "--responses_b", "b.jsonl", "--judge_model", "j", "--timeout", "5",
         "--max_retries", "1"])
    assert (config.timeout, config.max_retries) == (5.0, 1)
    judge = eval_run.make_oracle("j", "http://127.0.0.1:9/v1", max_new_tokens=64, timeout=config.timeout,
                                 max_retries=config.max_retries, local_without_base_url=True)
    assert isinstance(judge, OpenAIOracle) and (judge.timeout, judge.max_retries) == (5.0, 1)

    script_args = tuna.make_parser().parse_args_and_config(["--oracle_model", "m", "--oracle_base_url", "http://127.0.0.1:9/v1",
                                                "--oracle_timeout", "4", "--oracle_max_retries", "0",
                                                "--output_dir", "unused"])[0]
    from reflectune_hf.oracles import factory

    made, real = [], factory.make_oracle

    class Made(Exception):
        pass

    def recording(*args, **kwargs):  # the real factory, then stop before any request
        made.append(real(*args, **kwargs))
        raise Made

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(factory, "make_oracle", recording)
        with pytest.raises(Made):
            tuna.rank_dataset(None, script_args, "student")
    assert isinstance(made[0], OpenAIOracle) and (made[0].timeout, made[0].max_retries) == (4.0, 0)


# -- an empty selection, a missing token, a configuration that reproduces the run ------------------


@pytest.fixture
def hub_sent(monkeypatch):
    """Hub calls patched: what `push` would send."""
    from datasets import Dataset
    from huggingface_hub import DatasetCard, HfApi

    sent = []
    monkeypatch.setattr(DatasetDict, "push_to_hub", lambda self, repo_id, **kw: sent.append(("data", sorted(self))))
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kw: sent.append(("data", ["train"])))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: sent.append(("plots", kw["repo_id"])))
    monkeypatch.setattr(DatasetCard, "push_to_hub", lambda self, repo_id, **kw: sent.append(("card", str(self))))
    monkeypatch.setattr(HfApi, "repo_exists", lambda self, repo_id, **kw: False)  # a new repo: created private
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return sent


def test_a_folder_whose_selection_kept_nothing_reselects_pushes_and_refuses_to_train(tmp_path, hub_sent, capsys):
    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    from synthetic_variants import make_variants

    variants = make_variants(load_sample().select(range(12)))
    folder = tmp_path / "weak-oracle"
    save_local(DatasetDict({**variants, "selected": variants["reflect_both"].select([])}), folder)

    assert cli.main(["select", "--data", str(folder), "--no_require_below_one", "--output_dir",
                     str(tmp_path / "reselected")]) == 0
    assert "selected" in load_from_disk(str(tmp_path / "reselected" / "arrow"))
    assert cli.main(["push", "--data", str(folder), "--push_to_hub", "me/weak"]) == 0
    assert hub_sent[0] == ("data", ["origin", "reflect_both", "reflect_instruction", "reflect_response"])
    capsys.readouterr()

    assert cli.main(["sft", "--dataset_name", str(folder), "--model_name_or_path", "smollm2-135m-instruct",
                     "--output_dir", str(tmp_path / "sft")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the selection kept none" in err
    assert "--no_require_below_one" in err and "--top_fraction" in err and "--dataset_train_split reflect_both" in err
    assert not (tmp_path / "sft").exists()

    assert cli.main(["sft", "--dataset_name", str(folder), "--output_dir", str(tmp_path / "sft")]) == 2
    assert "--model_name_or_path" in capsys.readouterr().err


def test_a_rerun_into_the_same_folder_pushes_nothing_of_the_earlier_run(tmp_path, hub_sent, monkeypatch):
    """`select --quality_report`, then `select --selection none` into the same --output_dir: the
    first run's quality.json and `selected` split are gone, the user's file stays, and `push`
    publishes no quality statistics; a quality.json copied in by hand is not the run's either."""
    from reflectune_hf import load_sample
    from reflectune_hf.evaluation import quality
    from reflectune_hf.publishing.hub import save_local

    from synthetic_variants import make_variants

    real = quality.quality_report
    monkeypatch.setattr(quality, "quality_report", lambda data, coherence: real(data, coherence=False))  # no MiniLM
    save_local(make_variants(load_sample().select(range(12))), tmp_path / "scored")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["select", "--data", str(tmp_path / "scored"), "--output_dir", str(out),
                     "--quality_report"]) == 0
    assert (out / "quality.json").is_file() and (out / "arrow" / "selected").is_dir()
    assert cli.main(["select", "--data", str(tmp_path / "scored"), "--selection", "none",
                     "--output_dir", str(out)]) == 0
    assert not (out / "quality.json").exists() and not (out / "arrow" / "selected").exists()
    assert not list((out / "data").glob("selected-*")) and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "reflectune_config.json").read_text())["selection"] == "none"
    (out / "quality.json").write_text(json.dumps(real(load_sample(), coherence=False)))
    assert cli.main(["push", "--data", str(out), "--push_to_hub", "me/x"]) == 0
    assert hub_sent[0] == ("data", ["origin", "reflect_both", "reflect_instruction", "reflect_response"])
    assert "### Data quality" not in hub_sent[-1][1]


@pytest.mark.parametrize("command", ["recycle", "reflect", "score", "select", "push"])
def test_bad_output_arguments_exit_2_before_any_work(command, tmp_path, hub_sent, monkeypatch, capsys):
    """A repo id the Hub refuses, an output_dir that is a file (or under one), an output_dir that
    overlaps the --data folder: one line, exit 2, before the data is even loaded."""
    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    def no_work(*args, **kwargs):
        raise AssertionError("the job started")

    monkeypatch.setattr(pipeline, "load_input", no_work)
    for name in ("run_recycle", "run_reflect", "run_score", "run_select"):
        monkeypatch.setattr(pipeline, name, no_work)
    monkeypatch.setitem(cli.JOBS, command, (*cli.JOBS[command][:1], no_work, cli.JOBS[command][2]))
    folder = tmp_path / "scored"
    save_local(load_sample().select(range(2)), folder)
    (tmp_path / "afile").write_text("keep me")
    oracle = ["--oracle_model", "m"] if command in ("recycle", "reflect") else []
    output = lambda path: [] if command == "push" else ["--output_dir", str(path)]  # noqa: E731
    cases = [(["--push_to_hub", "not a repo", *output(tmp_path / "x")], "push_to_hub must be a Hub dataset repo id"),
             (["--push_to_hub", "me/x--y", *output(tmp_path / "x")], "Cannot have -- or .."),
             ]
    if command != "push":
        cases += [(output(tmp_path / "afile"), "is a file, not a folder"),
                  (output(tmp_path / "afile" / "sub"), "is a file, not a folder"),
                  (output(folder), "is output_dir"),
                  (output(folder / "sub"), "contains output_dir"),
                  (["--data", str(folder / "arrow"), *output(folder)], "is inside output_dir"),
                  (["--data", str(folder / "data" / "train-00000-of-00001.parquet"), *output(folder)],
                   "is a file the run writes")]
    for flags, message in cases:
        data = [] if "--data" in flags else ["--data", str(folder)]
        assert cli.main([command, *data, *oracle, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("reflectune "), (flags, err)
        assert "--output_dir" in err[-1] or "push_to_hub" in err[-1] or "repo id" in err[-1]
    assert (tmp_path / "afile").read_text() == "keep me" and not (tmp_path / "x").exists() and hub_sent == []


def test_push_of_the_default_folder_is_not_an_overlap(tmp_path, hub_sent, monkeypatch):
    """`push` reads the folder and writes none: its --data (default `reflectune-output`, also the
    default output_dir of the other commands) is not checked against an output folder."""
    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    monkeypatch.chdir(tmp_path)
    save_local(load_sample().select(range(2)), "reflectune-output")
    assert cli.main(["push", "--push_to_hub", "me/x"]) == 0 and hub_sent[0] == ("data", ["train"])


def test_push_without_a_token_says_how_to_log_in(tmp_path, hub_sent, monkeypatch, capsys):
    from huggingface_hub import constants

    from reflectune_hf import load_sample
    from reflectune_hf.publishing.hub import save_local

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    save_local(load_sample().select(range(4)), tmp_path / "out")
    assert cli.main(["push", "--data", str(tmp_path / "out"), "--push_to_hub", "me/data"]) == 1
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err and "401" not in err
    with LoopbackServer() as server:  # a whole run with --push_to_hub stops before its first request
        assert cli.main(["reflect", "--data", "sample", "--oracle_model", "m", "--base_url", server.base_url,
                         "--push_to_hub", "me/data", "--output_dir", str(tmp_path / "run")]) == 1
        assert server.log == []
    assert "hf auth login" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert hub_sent == []


def test_the_config_file_round_trips():
    """Every field, the `*_tokens*` ones and the base URL's path included, comes back from the file."""
    import tempfile

    from reflectune_hf.cli.jobs import RecycleConfig, config_record

    config = RecycleConfig(
        data="my.jsonl", oracle_model="gpt-test", base_url="http://127.0.0.1:8000/v1", max_new_tokens=321,
        tokens_per_minute=9000.0, requests_per_minute=60.0, max_tokens_per_batch=4096, selection="v1",
        top_fraction=0.2, compress=False, private=False, limit=7, push_to_hub="me/data")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reflectune_config.json"
        path.write_text(json.dumps(config_record(config)))
        assert cli.parse_config("recycle", ["--config", str(path)]) == config


def test_a_run_writes_a_config_that_reproduces_it(tmp_path):
    """A real `reflect` run (loopback oracle); its `reflectune_config.json` parses to the run's
    config and runs again; its card names the local data file, never its path."""
    rows = tmp_path / "private" / "rows.jsonl"
    rows.parent.mkdir()
    rows.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("hi", "yo")))
    with LoopbackServer() as server:
        args = ["reflect", "--data", str(rows), "--oracle_model", "echo", "--base_url", server.base_url,
                "--max_new_tokens", "77", "--tokens_per_minute", "100000", "--format_retries", "0",
                "--output_dir", str(tmp_path / "out")]
        assert cli.main(args) == 0
        file = tmp_path / "out" / "reflectune_config.json"
        record = json.loads(file.read_text())
        assert record["max_new_tokens"] == 77 and record["tokens_per_minute"] == 100000.0
        assert record["base_url"] == server.base_url and server.base_url.endswith("/v1")
        assert cli.parse_config("reflect", ["--config", str(file)]) == cli.parse_config("reflect", args[1:])
        assert cli.main(["reflect", "--config", str(file), "--output_dir", str(tmp_path / "again")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rows.jsonl (local file)" in card and str(tmp_path) not in card
    assert _read_output(tmp_path / "again") == _read_output(tmp_path / "out")


def test_reflect_reads_split_from_a_saved_folder(tmp_path):
    """`--split` was ignored for a saved multi-split folder, and the error told the user to use it."""
    from datasets import Dataset

    rows = {"instruction": ["Name a colour."], "input": [""], "output": ["Red."]}
    DatasetDict({"origin": Dataset.from_dict(rows), "other": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "run")
    chosen = pipeline.load_pairs(pipeline.ReflectConfig(oracle_model="m", data=str(tmp_path / "run"), split="origin"))
    assert chosen.to_dict() == rows
    with pytest.raises(ValueError, match=r"holds the splits \['origin', 'other'\], not 'train'.*--split origin"):
        pipeline.load_pairs(pipeline.ReflectConfig(oracle_model="m", data=str(tmp_path / "run")))


def test_score_and_select_read_split_of_a_saved_folder(tmp_path, capsys):
    """`score` / `select` on a saved multi-split folder ignored `--split` (every split was processed)."""
    from datasets import Dataset

    rows = {"instruction": ["Name a colour."], "input": [""], "output": ["Red."]}
    DatasetDict({"origin": Dataset.from_dict(rows), "other": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "run")
    config = pipeline.ScoreConfig(data=str(tmp_path / "run"), split="origin")
    assert list(pipeline.every_split(pipeline.load_input(config), config, "score")) == ["origin"]
    every = pipeline.ScoreConfig(data=str(tmp_path / "run"))
    assert list(pipeline.every_split(pipeline.load_input(every), every, "score")) == ["origin", "other"]
    out = str(tmp_path / "out")
    assert cli.main(["score", "--data", str(tmp_path / "run"), "--split", "bogus", "--output_dir", out]) == 1
    assert "--split bogus: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(["select", "--data", str(tmp_path / "run"), "--split", "origin", "--output_dir", out]) == 1
    assert "select reads the variant splits" in capsys.readouterr().err


@pytest.mark.parametrize("data", ["sample", "file"])
def test_a_split_that_the_data_cannot_have_is_refused(data, tmp_path, capsys):
    """`--split bogus` with the bundled sample or a local file was silently ignored."""
    if data == "file":
        (tmp_path / "rows.jsonl").write_text('{"instruction": "Hi", "input": "", "output": "Hello"}\n')
        data = str(tmp_path / "rows.jsonl")
    assert cli.main(["estimate", "--oracle_model", "m", "--data", data, "--split", "bogus"]) == 1
    assert "--split bogus: " in capsys.readouterr().err
    assert len(pipeline.load_input(pipeline.DataConfig(data=data))) >= 1  # the default split reads it
