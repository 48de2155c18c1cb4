"""`reflectune <command> --help` reads well: only the flags a command uses, grouped, negated flags
that say what they do, each default printed once, no internal references, and `sft` showing our
flags before TRL's."""

from __future__ import annotations

import argparse
import re

import pytest

from reflectune_hf.cli import main as cli

OUR_COMMANDS = ("recycle", "reflect", "score", "select", "estimate", "push", "eval")
ALL_COMMANDS = OUR_COMMANDS + ("sft", "tuna")


def help_text(name: str, capsys) -> str:
    assert cli.main([name, "--help"]) == 0
    return capsys.readouterr().out


def flags(name: str) -> set[str]:
    return {s for action in cli.command_parser(name)._actions for s in action.option_strings}


def entries(text: str) -> list[str]:
    """The help text cut into one entry per option (its option line and the lines of its help)."""
    out = []
    for line in text.splitlines():
        if line.startswith("  -"):
            out.append(line)
        elif out and line.startswith("    "):
            out[-1] += " " + line.strip()
    return out


@pytest.mark.parametrize("name, present, absent", [
    ("push", {"--data", "--push_to_hub", "--private", "--no_private"},
     {"--limit", "--quality_report", "--output_dir", "--license", "--split", "--oracle_model"}),
    ("estimate", {"--data", "--limit", "--oracle_model", "--input_price", "--tokenizer"},
     {"--output_dir", "--push_to_hub", "--private", "--quality_report", "--license", "--student_model"}),
    ("select", {"--data", "--selection", "--top_fraction", "--output_dir"}, {"--oracle_model", "--student_model"}),
    ("score", {"--data", "--student_model", "--score_batch_size", "--output_dir"}, {"--oracle_model", "--selection"}),
    ("reflect", {"--oracle_model", "--no_compress", "--output_dir"}, {"--student_model", "--selection"}),
    ("recycle", {"--oracle_model", "--student_model", "--selection", "--output_dir"}, {"--input_price"}),
])
def test_a_command_lists_only_the_flags_it_uses(name, present, absent):
    assert present <= flags(name) and not absent & flags(name)


@pytest.mark.parametrize("name, groups", [
    ("recycle", ["data", "output", "oracle", "student", "selection"]),
    ("estimate", ["data", "oracle", "prices"]),
    ("push", ["data", "output"]),
    ("eval", ["test sets", "models", "judge", "servers", "output"]),
    ("tuna", ["data and ranking"]),
])
def test_flags_are_grouped_under_headings(name, groups, capsys):
    text = help_text(name, capsys)
    for title in groups:
        assert f"\n{title}:\n" in text
    parser = cli.command_parser(name)
    group_of = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    if name == "recycle":
        assert (group_of["oracle_model"], group_of["student_model"], group_of["top_fraction"]) == \
            ("oracle", "student", "selection")
        assert (group_of["data"], group_of["push_to_hub"]) == ("data", "output")


def test_negated_flags_say_what_they_do(capsys):
    by_option = {e.split()[0].rstrip(","): e for e in entries(help_text("push", capsys))}
    assert "make the pushed repo public" in by_option["--no_private"]
    assert "private" in by_option["--private"] and "public" not in by_option["--private"]
    for name in OUR_COMMANDS + ("tuna",):
        parser = cli.command_parser(name)
        positive = {a.dest: a.help for a in parser._actions if not isinstance(a, argparse._StoreFalseAction)}
        for action in parser._actions:
            if isinstance(action, argparse._StoreFalseAction):
                assert action.help and action.help != positive[action.dest], (name, action.option_strings)
    recycle = {e.split()[0].rstrip(","): e for e in entries(help_text("recycle", capsys))}
    assert "no compression" in recycle["--no_compress"] and "skip" in recycle["--no_require_below_one"]
    sft = cli.command_parser("sft")
    negated = [a for a in sft._actions if isinstance(a, argparse._StoreFalseAction)]
    assert negated and all(a.help.startswith("set --") and "to false" in a.help for a in negated)


@pytest.mark.parametrize("name", OUR_COMMANDS)
def test_each_default_is_printed_once_and_none_is_not_printed(name, capsys):
    text = help_text(name, capsys)
    assert "(default: None)" not in text
    for entry in entries(text):
        assert len(re.findall(r"default", entry, flags=re.IGNORECASE)) <= 1, entry
    assert "(default: False)" not in "".join(e for e in entries(text) if e.lstrip().startswith("--no_"))


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_no_internal_references(name, capsys):
    text = help_text(name, capsys)
    if name in ("sft", "tuna"):  # TRL's and transformers' own help texts come after ours
        text = text.split("\n\n")[0:4]
        text = "\n\n".join(text)
    for needle in ("REFERENCE", "ARCHITECTURE", "§", "issue #", "scripts/"):
        assert needle not in text, (name, needle)
    assert not re.search(r"#\d+", text)
    assert text.startswith(f"usage: reflectune {name} [-h] [--config FILE]")


def test_sft_help_shows_our_flags_first_then_trls(capsys):
    text = help_text("sft", capsys)
    ours = text.index("reflectune: data, model and the paper's recipe:")
    trl = text.index("TRL's SFT options")
    assert ours < trl
    for flag in ("--model_name_or_path", "--dataset_name", "--dataset_train_split", "--learning_rate", "--config"):
        assert ours < text.index(f"  {flag}") < trl, flag
    for flag in ("--dataset_config", "--max_steps", "--use_peft"):
        assert text.index(f"  {flag}") > trl, flag
    assert "embedded alias" in text[ours:trl] and "(default: 2e-05)" in text[ours:trl]
    assert text.count("  --learning_rate") == 1  # moved, not copied


def test_sft_parsing_is_unchanged_by_the_help_layout(tmp_path):
    script_args, args, model_args, _ = cli.command_parser("sft").parse_args_and_config(
        ["--model_name_or_path", "smollm2-135m-instruct", "--dataset_name", "sample", "--output_dir", str(tmp_path),
         "--learning_rate", "1e-4", "--max_steps", "2"])
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("smollm2-135m-instruct", "sample")
    assert (args.learning_rate, args.max_steps, args.num_train_epochs) == (1e-4, 2, 3)


def test_the_command_list_names_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ALL_COMMANDS:
        assert f"  {name} " in out


# Flags that only say how oracle requests are sent (rate, concurrency, retries, batching): the
# commands that send requests take them, `estimate` (which sends nothing) does not.
SENDING_FLAGS = ("--max_concurrency", "--timeout", "--max_retries", "--requests_per_minute", "--tokens_per_minute",
                 "--format_retries", "--batch_api", "--backend", "--local_batch_size", "--reflect_batch_size")
ESTIMATE_FIELDS = {"data", "split", "limit", "oracle_model", "base_url", "context_window", "context_tokenizer",
                   "local_engine", "max_new_tokens", "temperature", "prompt_set", "compress", "structured",
                   "input_price", "output_price", "tokenizer"}


def test_estimate_lists_only_what_shapes_the_requests_it_counts(capsys):
    parser = cli.command_parser("estimate")
    assert {a.dest for a in parser._actions} - {"help", "config"} == ESTIMATE_FIELDS
    text = help_text("estimate", capsys)
    for flag in SENDING_FLAGS:
        assert f"  {flag}" not in text, flag
    for name in ("recycle", "reflect"):
        assert set(SENDING_FLAGS) <= flags(name), name


@pytest.mark.parametrize("flag, value", [("--max_concurrency", "4"), ("--tokens_per_minute", "1000"),
                                         ("--max-retries", "2"), ("--timeout", "5"), ("--batch_api", None)])
def test_estimate_refuses_a_sending_flag_in_one_line(flag, value, capsys):
    argv = ["estimate", "--oracle_model", "m", flag] + ([value] if value else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    name = flag[2:].replace("-", "_")
    assert len(errors) == 1 and errors[0].startswith("reflectune estimate: error: "), err
    assert f"--{name} is not a flag of reflectune estimate" in errors[0]
    assert "recycle, reflect" in errors[0] and "sends none" in errors[0]


def test_a_config_key_of_another_command_is_refused_by_every_command(tmp_path, capsys):
    """A `--config` key that is not the command's own flag is an error naming the key and the
    file, for estimate's sending keys as for select's oracle keys; recycle takes them."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: sample\noracle_model: m\nmax_concurrency: 4\ntimeout: 9\n")
    assert cli.main(["estimate", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"--max_concurrency, --timeout (in {recipe}) are not flags of reflectune estimate" in err
    assert "flags of recycle, reflect: they say how oracle requests are sent, and estimate sends none" in err
    assert cli.main(["select", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"--oracle_model, --max_concurrency, --timeout (in {recipe}) are not flags of reflectune select" in err
    config = cli.parse_config("recycle", ["--config", str(recipe)])
    assert (config.max_concurrency, config.timeout, config.oracle_model) == (4, 9, "m")
    kept = tmp_path / "estimate.yaml"
    kept.write_text("data: sample\noracle_model: m\nmax_new_tokens: 100\ncompress: false\n")
    config = cli.parse_config("estimate", ["--config", str(kept), "--temperature", "0.5"])
    assert (config.max_new_tokens, config.compress, config.temperature) == (100, False, 0.5)


def test_the_command_line_without_training_imports_neither_trl_nor_torch():
    """`reflectune --help`, and the parsers of the commands that train nothing, load no TRL,
    transformers or torch (seconds of imports); `sft --help` still shows TRL's flags."""
    import json
    import subprocess
    import sys

    probe = (
        "import contextlib, io, json, sys\n"
        "from reflectune_hf.cli.main import main\n"
        "heavy = lambda: sorted(m for m in ('trl', 'torch', 'transformers') if m in sys.modules)\n"
        "seen = {'import': heavy()}\n"
        "for argv in (['--help'], ['estimate', '--help'], ['push', '--help'], ['select', '--help'],\n"
        "             ['recycle', '--help'], ['score', '--help'], ['eval', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0\n"
        "    seen[' '.join(argv)] = heavy()\n"
        "print(json.dumps(seen))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen == {name: [] for name in seen}, seen


def test_the_console_script_freezes_only_as_the_process_ends():
    """The `reflectune` script (`run`) moves every object into the permanent generation just before
    it exits, so the interpreter's final collection does not walk torch's and transformers'
    objects; `main` called from Python freezes nothing. The script's entry point is `run`."""
    import configparser
    import gc
    import subprocess
    import sys
    from pathlib import Path

    entry = configparser.ConfigParser()
    entry.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert "reflectune = reflectune_hf.cli.main:run" in entry["options.entry_points"]["console_scripts"]
    before = gc.get_freeze_count()
    assert cli.main(["--help"]) == 0
    assert gc.get_freeze_count() == before
    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
             "sys.argv = ['reflectune', 'no-such-command']\n"
             "from reflectune_hf.cli.main import run\n"
             "run()\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "unknown command" in out.stderr, out.stderr
    assert out.stdout.splitlines()[-1] == "frozen True", out.stdout
    out = subprocess.run([sys.executable, "-m", "reflectune_hf", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "usage: reflectune" in out.stdout, out.stderr


def test_the_local_oracle_help_names_no_single_engine(capsys):
    """`local:<model>` runs on llama.cpp for the embedded GGUF (transformers elsewhere, or as
    `--local_engine` says); the help said "a transformers model run here"."""
    [entry] = [e for e in entries(help_text("reflect", capsys)) if e.lstrip().startswith("--oracle_model")]
    assert "local:<model>" in entry and "--local_engine" in entry and "transformers model" not in entry
    tuna = " ".join(e for e in entries(help_text("tuna", capsys)) if e.lstrip().startswith("--oracle_base_url"))
    assert "llama.cpp" in tuna and "transformers model" not in tuna
