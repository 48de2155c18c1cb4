"""Input validation of the `reflectune` commands: bad values exit 2 with one line, before any work."""

from __future__ import annotations

import pytest

from reflectune_hf.cli import main as cli
from reflectune_hf.cli.configs import EstimateConfig, RecycleConfig


def _one_line_exit_2(argv, capsys) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()[-1:]) == 1 and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("flags, message", [
    (["--input_price", "nan", "--output_price", "1"], "input_price must be a finite number >= 0, got nan"),
    (["--input_price", "1", "--output_price", "inf"], "output_price must be a finite number >= 0, got inf"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
])
def test_nan_and_inf_are_refused(flags, message, capsys):
    err = _one_line_exit_2(["estimate", "--oracle_model", "m", "--limit", "1", *flags], capsys)
    assert message in err


@pytest.mark.parametrize("values, message", [
    ({"limit": 1.5}, "limit must be an integer >= 1, got 1.5"),
    ({"limit": True}, "limit must be an integer >= 1, got True"),
    ({"max_new_tokens": 64.0}, "max_new_tokens must be an integer >= 1, got 64.0"),
    ({"max_concurrency": 2.5}, "max_concurrency must be an integer >= 1, got 2.5"),
    ({"max_length": 512.0}, "max_length must be an integer >= 2, got 512.0"),
    ({"timeout": float("inf")}, "timeout must be a finite number > 0, got inf"),
    ({"requests_per_minute": float("nan")}, "requests_per_minute must be a finite number > 0, got nan"),
    ({"temperature": float("-inf")}, "temperature must be a finite number >= 0, got -inf"),
    # A bool field took any value: "false" (from a hand-written dict or environment) was true.
    ({"compress": "false"}, "compress takes True or False, got 'false'"),
    ({"private": None}, "private takes True or False, got None"),
    ({"require_below_one": 0}, "require_below_one takes True or False, got 0"),
])
def test_python_configs_refuse_non_integers_and_non_finite_numbers(values, message):
    with pytest.raises(ValueError) as err:
        RecycleConfig(oracle_model="m", **values)
    assert str(err.value) == message


@pytest.mark.parametrize("flags", [["--input_price", "0.15"], ["--output_price", "0.6"]])
def test_estimate_refuses_one_price_without_the_other(flags, capsys):
    """A missing price was taken as 0: `--input_price 0.15` alone printed a cost without the output
    tokens (most of a reflect run's), as if they were free."""
    err = _one_line_exit_2(["estimate", "--oracle_model", "m", "--limit", "1", *flags], capsys)
    assert "give both --input_price and --output_price" in err


def test_finite_values_and_integers_still_pass():
    config = RecycleConfig(oracle_model="m", limit=3, timeout=30, temperature=0.7, requests_per_minute=60.5)
    assert (config.limit, config.timeout, config.temperature) == (3, 30, 0.7)
    assert EstimateConfig(oracle_model="m", input_price=0, output_price=0.6).output_price == 0.6


TUNA = ["tuna", "--oracle_model", "local:smollm2-135m-instruct", "--model_name_or_path", "smollm2-135m-instruct"]
EVAL = ["eval", "--test_sets", "vicuna", "--model_a", "a", "--model_b", "b", "--judge_model", "j"]


@pytest.fixture
def nothing_runs(monkeypatch):
    """The jobs' run functions fail the test if a bad argument lets them start."""
    from reflectune_hf.cli import eval_job, tuna_job

    def started(*args, **kwargs):
        raise AssertionError("the job started despite a bad argument")

    monkeypatch.setattr(tuna_job, "run_tuna", started)
    monkeypatch.setattr(eval_job, "run_eval", started)
    for name, (config_type, _, text) in list(cli.JOBS.items()):
        monkeypatch.setitem(cli.JOBS, name, (config_type, started, text))


@pytest.mark.parametrize("argv, message", [
    ([*TUNA, "--stage", "bogus"], "stage must be one of ['probabilistic', 'contextual'], got 'bogus'"),
    ([*TUNA, "--max_samples", "-1"], "max_samples must be an integer >= 1, got -1"),
    ([*TUNA, "--max_samples", "0"], "max_samples must be an integer >= 1, got 0"),
    ([*TUNA, "--num_responses", "0"], "num_responses must be an integer >= 1, got 0"),
    ([*TUNA, "--sample_temperature", "nan"], "sample_temperature must be a finite number >= 0, got nan"),
    ([*TUNA, "--oracle_timeout", "0"], "oracle_timeout must be a number > 0, got 0.0"),
    ([*TUNA, "--oracle_max_retries", "-1"], "oracle_max_retries must be an integer >= 0, got -1"),
    (["tuna", "--oracle_model", "local:smollm2-135m-instruct"], "Set --model_name_or_path"),
    ([*EVAL, "--max_rows", "0"], "max_rows must be an integer >= 1, got 0"),
    ([*EVAL, "--max_new_tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    ([*EVAL, "--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    ([*EVAL, "--timeout", "-1"], "timeout must be a number > 0, got -1.0"),
])
def test_tuna_and_eval_arguments_exit_2_before_the_job_starts(argv, message, nothing_runs, capsys):
    assert message in _one_line_exit_2(argv, capsys)


def test_tuna_check_args_also_guards_run_tuna():
    """scripts/tuna.py calls run_tuna directly: the same check runs there, before any data loads."""
    from reflectune_hf.cli import tuna_job

    args = tuna_job.make_parser().parse_args_and_config([*TUNA[1:], "--output_dir", "unused"])
    args[0].stage = "bogus"
    with pytest.raises(ValueError, match="stage must be one of"):
        tuna_job.run_tuna(*args)


@pytest.mark.parametrize("text", ["", "[]", "[ ]\n", "\n\n  \n"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_data_file_without_rows_is_named_in_one_line(text, suffix, tmp_path):
    from reflectune_hf.data import load_data

    path = tmp_path / f"empty{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"holds no rows \(an empty file or JSON array\)"):
        load_data(path)


@pytest.mark.parametrize("command", [
    ["reflect", "--oracle_model", "m"],
    ["sft", "--model_name_or_path", "smollm2-135m-instruct"],
])
def test_reflect_and_sft_refuse_an_empty_json_array_in_one_line(command, tmp_path, capsys):
    (tmp_path / "e.json").write_text("[]\n")
    data_flag = "--dataset_name" if command[0] == "sft" else "--data"
    code = cli.main([*command, data_flag, str(tmp_path / "e.json"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and f"{tmp_path / 'e.json'} holds no rows" in err[-1]
    assert "corresponds to no data" not in "\n".join(err)


@pytest.mark.parametrize("row, problem", [
    ({"instruction": None, "input": "", "output": "Blue."}, "id=0: empty instruction"),
    ({"instruction": "Name a colour.", "input": "", "output": None}, "id=0: empty output"),
])
def test_estimate_refuses_the_rows_reflect_refuses(row, problem, tmp_path, capsys):
    """estimate counts what reflect would send: a row reflect refuses is refused here too, with the same check."""
    import json

    path = tmp_path / "rows.jsonl"
    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    path.write_text(json.dumps(row) + "\n" + json.dumps(good) + "\n")
    assert cli.main(["estimate", "--oracle_model", "m", "--data", str(path), "--input_price", "1",
                     "--output_price", "2"]) == 1
    err = capsys.readouterr().err.strip()  # datasets' progress bars, then the one error line
    assert "Traceback" not in err and "estimate: 1 of 2 rows cannot be recycled" in err.splitlines()[-1]
    assert problem in err.splitlines()[-1]


LOCAL = "local:smollm2-135m-instruct"


@pytest.mark.parametrize("argv, message", [
    (["reflect", "--oracle_model", LOCAL, "--batch_api"], "--batch_api is for a model on a server"),
    (["recycle", "--oracle_model", LOCAL, "--base_url", "http://127.0.0.1:9/v1"], "--base_url is for a model on a"),
    (["estimate", "--oracle_model", "local:", "--base_url", "http://127.0.0.1:9/v1"], "drop --base_url or the local:"),
    ([*TUNA, "--oracle_base_url", "http://127.0.0.1:9/v1"], "--oracle_base_url is for a model on a server"),
    ([*EVAL[:-1], LOCAL, "--judge_base_url", "http://127.0.0.1:9/v1"], "but judge_model 'local:smollm2"),
    (["reflect", "--oracle_model", "gpt-4o-mini", "--batch_api", "--tokens_per_minute", "1000"],
     "--tokens_per_minute applies to online requests; the Batch API ignores it"),
    (["recycle", "--oracle_model", "gpt-4o-mini", "--batch_api", "--context_window", "8192"],
     "--context_window applies to online requests"),
    # A local: model runs here: rate limits and a context window were silently ignored.
    (["reflect", "--oracle_model", LOCAL, "--requests_per_minute", "60"], "--requests_per_minute is for a model on"),
    (["recycle", "--oracle_model", LOCAL, "--context_window", "2048"], "drop --context_window or the local: prefix"),
    (["estimate", "--oracle_model", "local:", "--context_tokenizer", "gpt2"], "--context_tokenizer is for a model"),
    (["select", "--data", "scored", "--selection", "none", "--top_fraction", "0.1"],
     "top_fraction keeps the top of a selection, but selection is 'none'"),
])
def test_conflicting_options_exit_2_in_one_line(argv, message, nothing_runs, capsys):
    assert message in _one_line_exit_2(argv, capsys)


def test_make_oracle_refuses_a_local_model_with_a_server_option():
    from reflectune_hf.oracles.factory import make_oracle

    with pytest.raises(ValueError, match="--batch_api is for a model on a server"):
        make_oracle(LOCAL, batch_api=True)
    with pytest.raises(ValueError, match="--base_url is for a model on a server"):
        make_oracle(LOCAL, "http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="--requests_per_minute applies to online requests"):  # it was ignored
        make_oracle("gpt-4o-mini", batch_api=True, requests_per_minute=60)
    with pytest.raises(ValueError, match="--tokens_per_minute is for a model on a server"):  # it was ignored
        make_oracle(LOCAL, tokens_per_minute=1000)


def test_selection_none_warns_that_ratio_is_ignored(caplog):
    from reflectune_hf.cli.configs import SelectConfig

    with caplog.at_level("WARNING"):
        SelectConfig(data="scored", selection="none", ratio="loss")
    assert "selection is 'none': ratio and require_below_one are ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        SelectConfig(data="scored", selection="none")
    assert caplog.text == ""
