"""The `reflectune` command: thin parsing over the jobs of this package (`jobs`, `sft_job`,
`tuna_job`, `eval_job`); the repository's `scripts/*.py` are wrappers around the same jobs.

Each subcommand takes its config dataclass's fields as flags (`--oracle_model` or
`--oracle-model`) or from a YAML file (`--config recipe.yaml`, the same field names; flags
override it), in the manner of TRL's `TrlParser`.

    reflectune recycle --oracle_model local:smollm2-135m-instruct --data sample --output_dir out
    reflectune recycle --oracle_model gpt-4o-mini --data tatsu-lab/alpaca --push_to_hub me/alpaca-recycled
    reflectune estimate --oracle_model gpt-4o-mini --data tatsu-lab/alpaca --input_price 0.15 --output_price 0.6
    reflectune sft --config scripts/configs/smoke_cpu.yaml

Exit codes: 0 success, 1 a failed job (the error is printed without a traceback; `-v` shows
it), 2 bad arguments. `-v` also shows the HTTP library's and the openai SDK's per-request logs,
kept at WARNING otherwise.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import sys
from typing import Callable, NoReturn, Optional

from dataclasses import fields

from . import jobs
from .arguments import CommandParser, UnknownArguments
from .configs import InputConfig, OracleClientConfig, PushConfig

logger = logging.getLogger("reflectune_hf")
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai")  # kept at WARNING unless -v

JOBS: dict[str, tuple[type, Callable, str]] = {
    "recycle": (jobs.RecycleConfig, jobs.run_recycle,
                "the whole method: compress, reflect, extract, score, select, save/push with a card"),
    "reflect": (jobs.ReflectConfig, jobs.run_reflect, "the four aligned variants, no scores"),
    "score": (jobs.ScoreConfig, jobs.run_score, "IFD / r-IFD columns on every split of a dataset"),
    "select": (jobs.SelectConfig, jobs.run_select, "V2 / V1 selection on scored variants"),
    "estimate": (jobs.EstimateConfig, jobs.run_estimate, "tokens and cost of a reflect run; sends nothing"),
    "push": (PushConfig, None, "push an output folder to the Hub (--data folder --push_to_hub repo)"),
}
# TRL-style jobs: a module of this package with make_parser(prog=...) and its run function.
TRAINING_COMMANDS = {
    "sft": ("sft_job", "run_sft", "fine-tune with TRL's SFTTrainer and the Vicuna v1.1 template"),
    "tuna": ("tuna_job", "run_tuna", "Tuna fine-tuning: rank sampled answers, then train on the ranking"),
    "eval": ("eval_job", "run_eval", "judge two models' answers pairwise, in both orders"),
}


def _usage() -> str:
    lines = ["usage: reflectune <command> [--config file.yaml] [--flag value ...]", "", "commands:"]
    for name, (_, _, text) in JOBS.items():
        lines.append(f"  {name:<10}{text}")
    for name, (_, _, text) in TRAINING_COMMANDS.items():
        lines.append(f"  {name:<10}{text}")
    lines.append("\n`reflectune <command> --help` lists a command's flags; -v shows debug logs and tracebacks.")
    return "\n".join(lines)


def command_parser(name: str):
    """The argument parser of `reflectune <name>` (what `--help` prints).

    Example:
        >>> from reflectune_hf.cli.main import command_parser
        >>> "--limit" in command_parser("push").format_help()
        False
    """
    if name in TRAINING_COMMANDS:
        return _training_module(name).make_parser(prog=f"reflectune {name}")
    config_type, _, text = JOBS[name]
    return CommandParser((config_type,), prog=f"reflectune {name}", description=text)


def _training_module(name: str):
    return importlib.import_module(f"{__package__}.{TRAINING_COMMANDS[name][0]}")


def parse_arguments(parser, argv: Optional[list[str]] = None, check: Optional[Callable] = None) -> tuple:
    """`parser.parse_args_and_config(argv)` (default `sys.argv[1:]`), then `check(*args)` (a job's
    `check_args`: bad arguments found before anything loads), as the training commands and the
    `scripts/*.py` wrappers read their command lines: a bad flag, value or `--config` file exits 2
    (argparse's `SystemExit`) with one line, not a traceback.

    Example:
        >>> from reflectune_hf.cli.main import command_parser, parse_arguments
        >>> parse_arguments(command_parser("select"), ["--data", "scored", "--limit", "2"])[0].limit
        2
    """
    try:
        args = parser.parse_args_and_config(argv)
        if check is not None:
            check(*args)
    except (ValueError, FileNotFoundError) as err:  # a bad value, or a bad or missing --config file
        parser.error(one_line(err))
    return args


def _run_training(name: str, argv: list[str]) -> int:
    module, run_name = _training_module(name), TRAINING_COMMANDS[name][1]
    args = parse_arguments(command_parser(name), argv, getattr(module, "check_args", None))
    getattr(module, run_name)(*args)
    return 0


def _push(config: PushConfig) -> str:
    """Push the folder `config.data` with the card of the run that wrote it: its configuration
    and `quality.json` are used only when they belong to that run (`outputs.run_file`: listed in
    the folder's manifest), never a file an earlier run left there."""
    from ..publishing.hub import push_to_hub
    from ..publishing.outputs import run_file

    data = jobs.load_input(InputConfig(data=config.data))  # no output_dir: push writes no folder
    context_file = run_file(config.data, jobs.CONTEXT_FILE)  # the configuration of the run that wrote the folder
    record = json.loads(context_file.read_text()) if context_file else {}
    context = jobs.card_context(record, data=data)
    quality_file = run_file(config.data, "quality.json")  # written by --quality_report
    quality = json.loads(quality_file.read_text()) if quality_file else None
    return push_to_hub(data, config.push_to_hub, private=config.private, card_context=context, quality=quality)


def _print_result(name: str, result) -> None:
    if isinstance(result, jobs.JobResult):
        print(result.table())
    elif isinstance(result, dict):
        width = max(len(k) for k in result)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    elif result is not None:
        print(result)


def _whose(name: str, names: list[str]) -> str:
    """Which other commands take the flags `names` (" (flags of recycle, reflect: ...)"), or ""."""
    owners = [other for other, (config_type, _, _) in JOBS.items()
              if other != name and set(names) <= {f.name for f in fields(config_type)}]
    if not owners:
        return ""
    one = len(names) == 1
    why = ""
    if set(names) <= {f.name for f in fields(OracleClientConfig)}:
        why = f": {'it says' if one else 'they say'} how oracle requests are sent, and {name} sends none"
    return f" ({'a flag' if one else 'flags'} of {', '.join(owners)}{why})"


def parse_config(name: str, argv: list[str]):
    """The config of job `name` from its flags and `--config` file, as `reflectune <name>` reads
    it; bad arguments exit 2 (argparse's `SystemExit`) with one line naming the problem.

    Example:
        >>> from reflectune_hf.cli.main import parse_config
        >>> parse_config("select", ["--data", "scored", "--top_fraction", "0.1"]).top_fraction
        0.1
    """
    parser = command_parser(name)
    try:
        (config,) = parser.parse_args_and_config(argv)
    except UnknownArguments as err:  # a flag or --config key of another command: say whose, in one line
        parser.error(f"{err}{_whose(name, err.names)}; `reflectune {name} --help` lists its flags")
    except (ValueError, FileNotFoundError) as err:  # a bad value, or a bad or missing --config file
        parser.error(one_line(err))
    if isinstance(config, jobs.OracleRequestConfig) and not config.oracle_model:
        parser.error(jobs.ORACLE_REQUIRED)
    return config


def main(argv: Optional[list[str]] = None) -> int:
    """Run one `reflectune` command in this process and return its exit code (0, 1, 2 or 130).

    Safe to call from Python (tests, notebooks): it changes nothing process-wide beyond logging
    configuration. The console script goes through `run`, which also ends the process.

    Example:
        >>> from reflectune_hf.cli.main import main
        >>> main(["--help"])  # doctest: +ELLIPSIS
        usage: reflectune <command> ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv
    argv = [a for a in argv if a != "-v"]
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # one INFO line per HTTP request (and per SDK retry) is noise: -v shows them
        for name in HTTP_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS and name not in TRAINING_COMMANDS:
        print(f"reflectune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        if name in TRAINING_COMMANDS:
            return _run_training(name, rest)
        config = parse_config(name, rest)
        if getattr(config, "push_to_hub", None):  # no token: say how to log in before any work, not a 401 after it
            from ..publishing.hub import require_token

            require_token()
        result = _push(config) if name == "push" else JOBS[name][1](config)
    except SystemExit as exit_:  # argparse: 2 for bad arguments, 0 for --help
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("reflectune: interrupted; rerun the same command to resume from the caches", file=sys.stderr)
        return 130
    except Exception as err:  # a failed job: one clear line, the traceback with -v
        if verbose:
            logger.exception("%s failed", name)
        print(f"reflectune {name}: error: {type(err).__name__}: {one_line(err)}", file=sys.stderr)
        return 1
    _print_result(name, result)
    return 0


def one_line(err: BaseException) -> str:
    """`err`'s message on one line: a library's multi-line message (huggingface_hub's HTTP errors:
    request id, status, URL, advice) keeps every line, joined.

    Example:
        >>> one_line(ValueError("(Request ID: abc)\\n\\n403 Forbidden.\\nMake sure your token can write."))
        '(Request ID: abc) 403 Forbidden. Make sure your token can write.'
    """
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def end_process(code: int) -> NoReturn:
    """End a `reflectune` process with exit code `code`, skipping the interpreter's final scan.

    At exit, Python's last garbage collection walks every object still tracked: after torch and
    transformers are loaded that is ~400,000 objects and ~1.2 s of a 2-core machine's time
    (measured: 8.2 s for a model load and exit, 5.7 s frozen first). Moving them all into the
    permanent generation (`gc.freeze`) just before exiting skips that walk; nothing runs after it
    but the exit itself, so nothing is kept alive that would otherwise have been freed. A
    program-level choice made only here, at the end of the console script, never by the library.
    """
    gc.freeze()
    raise SystemExit(code)


def run() -> NoReturn:
    """The `reflectune` console script (and `python -m reflectune_hf`): `main`, then `end_process`."""
    end_process(main())


if __name__ == "__main__":
    run()
