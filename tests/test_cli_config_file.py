"""`--config FILE` is read the way the command line is: `--config=FILE` too, once, its values
converted and checked like flags, a broken file named in one line (exit 2, before any work), and
no abbreviated flag taken for another."""

from __future__ import annotations

import pytest

from reflectune_hf.cli import main as cli


def run(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()[-1] if captured.err.strip() else captured.out


def write(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_equals_file_is_read_not_swallowed(tmp_path):
    """`--config=recipe.yaml` was taken by the help-only `--config` flag: the run used no file."""
    recipe = write(tmp_path, "limit: 3\ntop_fraction: 0.2\n")
    config = cli.parse_config("select", [f"--config={recipe}", "--data", "scored"])
    assert (config.limit, config.top_fraction) == (3, 0.2)


@pytest.mark.parametrize("command", ["sft", "tuna"])
def test_config_equals_file_reaches_trl_parsing(command):
    """TRL's parser only knew `--config FILE`: `--config=FILE` came back as an extra namespace."""
    recipe = {"sft": "scripts/configs/smoke_cpu.yaml", "tuna": "scripts/configs/tuna_smoke_cpu.yaml"}[command]
    spaced = cli.command_parser(command).parse_args_and_config(["--config", recipe])
    joined = cli.command_parser(command).parse_args_and_config([f"--config={recipe}"])
    assert len(joined) == len(spaced) and joined == spaced


@pytest.mark.parametrize("argv, message", [
    (["--config", "{a}", "--config", "{b}"], "--config given 2 times"),
    (["--conf", "{a}"], "--conf is not a flag of reflectune select"),
    (["--top_frac", "0.5"], "--top_frac is not a flag of reflectune select"),
    (["--config"], "--config needs a YAML file"),
    (["--data", "scored", "extra"], "unexpected value 'extra'"),
])
def test_repeated_abbreviated_or_stray_arguments_exit_2(argv, message, tmp_path, capsys):
    a, b = write(tmp_path, "limit: 1\n", "a.yaml"), write(tmp_path, "limit: 2\n", "b.yaml")
    code, line = run(["select"] + [arg.format(a=a, b=b) for arg in argv], capsys)
    assert code == 2 and message in line, line


@pytest.mark.parametrize("text, message", [
    ("limit: 1.5\n", "`limit` takes an integer, got 1.5"),
    ("limit: true\n", "`limit` takes an integer, got True"),
    ("top_fraction: [0.1]\n", "`top_fraction` takes a number, got [0.1]"),
    ("output_dir: {a: 1}\n", "`output_dir` takes a string, got {'a': 1}"),
    ("selection: best\n", "selection must be one of"),
    ("private: [1]\n", "`private` takes true or false"),
    (": :\n  bad: [\n", "is not valid YAML at line 1, column 1"),
    ("top-fraction: 0.1\n", "write top_fraction (not top-fraction)"),
    ("config: other.yaml\n", "--config (in "),
    ("help: true\n", "--help (in "),
])
def test_a_bad_config_value_is_one_line_and_exit_2(text, message, tmp_path, capsys):
    """YAML values became argparse defaults as they were: `limit: 1.5` failed deep in the run
    (exit 1), `output_dir: 5`-like mistakes after the whole selection, `[1]` read as true."""
    code, line = run(["select", "--data", "scored", "--config", write(tmp_path, text)], capsys)
    assert code == 2 and message in line, line


def test_config_values_are_converted_like_flags(tmp_path):
    recipe = write(tmp_path, "limit: '4'\ntop_fraction: 1e-1\nprivate: 'false'\n")
    config = cli.parse_config("select", ["--config", recipe, "--data", "scored"])
    assert (config.limit, config.top_fraction, config.private) == (4, 0.1, False)
    assert cli.parse_config("select", ["--config", recipe, "--data", "scored", "--limit", "2"]).limit == 2


def test_training_commands_refuse_an_abbreviated_flag_and_a_broken_file(tmp_path, capsys):
    code, line = run(["sft", "--learning_rat", "1"], capsys)
    assert code == 2 and "--learning_rat" in line, line
    code, line = run(["sft", f"--config={write(tmp_path, ': :', 'broken.yaml')}"], capsys)
    assert code == 2 and "is not valid YAML" in line, line


@pytest.mark.parametrize("text, message", [
    ("private:\n", "`private` takes true or false, got null"),
    ("require_below_one: null\n", "`require_below_one` takes true or false, got null"),
    ("split: ~\n", "`split` takes a string, got null"),
])
def test_null_for_a_field_that_takes_no_none_is_refused(text, message, tmp_path, capsys):
    """An empty YAML value (`private:`) became None: a falsy `private` pushed a public repo, a
    None `require_below_one` skipped the V2 checks, a None `split` failed only in the job."""
    code, line = run(["select", "--data", "scored", "--config", write(tmp_path, text)], capsys)
    assert code == 2 and message in line, line
    recipe = write(tmp_path, "limit: null\ntop_fraction: ~\npush_to_hub:\n", "optional.yaml")  # Optional: kept
    config = cli.parse_config("select", ["--config", recipe, "--data", "scored"])
    assert (config.limit, config.top_fraction, config.push_to_hub) == (None, None, None)


def test_a_config_that_is_a_folder_or_not_utf8_is_a_usage_error(tmp_path, capsys):
    """`--config <folder>` crashed as a failed job (exit 1, IsADirectoryError); a Latin-1 file
    said only "'utf-8' codec can't decode byte 0xfc", naming no file."""
    code, line = run(["select", "--data", "scored", "--config", str(tmp_path)], capsys)
    assert code == 2 and f"--config {tmp_path} is a folder" in line, line
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"license: \"\xfc\"\n")
    code, line = run(["select", "--data", "scored", "--config", str(latin)], capsys)
    assert code == 2 and f"{latin} is not valid YAML" in line, line


@pytest.mark.parametrize("script, argv, message", [
    ("score.py", ["--limit", "0"], "limit must be an integer >= 1, got 0"),
    ("score.py", ["--bogus", "1"], "--bogus is not a flag of"),
    ("evaluate.py", ["--config", "missing.yaml"], "No such file or directory: 'missing.yaml'"),
])
def test_the_wrapper_scripts_exit_2_in_one_line_on_bad_arguments(script, argv, message, monkeypatch, capsys):
    """scripts/score.py, sft.py and tuna.py ended in a ValueError traceback (exit 1) on a bad flag
    or value, where `reflectune` exits 2 with one line; evaluate.py missed a missing --config."""
    import runpy
    from pathlib import Path

    monkeypatch.setattr("sys.argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(Path(__file__).parents[1] / "scripts" / script), run_name="__main__")
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_flag_with_one_dash_is_named_as_such(capsys):
    """`-limit 3` said "--limit is not a flag of reflectune select (a flag of recycle, ...)": a
    flag the command has, and its help lists."""
    code, line = run(["select", "--data", "scored", "-limit", "3"], capsys)
    assert code == 2 and "-limit: a flag takes two dashes (--limit)" in line, line


def test_the_env_block_sets_strings_refuses_null_values_and_may_be_empty(tmp_path, capsys, monkeypatch):
    """`env: {HF_HUB_OFFLINE: null}` set the variable to the string "None"; an `env:` block whose
    entries are all commented out (YAML null) was refused as not a mapping."""
    monkeypatch.setenv("REFLECTUNE_TEST_VAR", "x")  # recorded, so the variable is gone after the test
    monkeypatch.delenv("REFLECTUNE_TEST_VAR")
    code, line = run(["select", "--data", "scored", "--config",
                      write(tmp_path, "env:\n  REFLECTUNE_TEST_VAR:\n")], capsys)
    assert code == 2 and "`env` variable REFLECTUNE_TEST_VAR is null" in line, line
    assert "REFLECTUNE_TEST_VAR" not in __import__("os").environ
    empty = write(tmp_path, "limit: 2\nenv:\n  # HF_TOKEN: hf_...\n", "empty_env.yaml")
    assert cli.parse_config("select", ["--config", empty, "--data", "scored"]).limit == 2
    given = write(tmp_path, "env:\n  REFLECTUNE_TEST_VAR: 3\n", "env.yaml")
    cli.parse_config("select", ["--config", given, "--data", "scored"])
    assert __import__("os").environ["REFLECTUNE_TEST_VAR"] == "3"
