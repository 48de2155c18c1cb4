"""The `--config FILE` of every command: found in the arguments (`--config FILE` or
`--config=FILE`, once), read as a YAML mapping (its `env:` block applied), and each value read
as its flag reads text (`config_value`), so a file and a command line accept the same values.

Example:
    >>> import argparse
    >>> from reflectune_hf.cli.config_file import config_value, take_config
    >>> take_config(["--limit", "2", "--config=recipe.yaml"])
    (['--limit', '2'], 'recipe.yaml')
    >>> limit = argparse.ArgumentParser().add_argument("--limit", type=int)
    >>> config_value(limit, "limit", "4", "recipe.yaml")
    4
"""

from __future__ import annotations

import argparse
import os
from copy import copy
from typing import Any, Optional


def string_to_bool(value) -> bool:
    """`--flag yes|no|true|false|1|0|...` (the spellings `HfArgumentParser` accepts)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"true or false expected, got {value!r}")


def take_config(args: list[str]) -> tuple[list[str], Optional[str]]:
    """`args` without their `--config FILE` (or `--config=FILE`), and FILE (None without one).

    Raises:
        ValueError: `--config` without a file, or given more than once.

    Example:
        >>> from reflectune_hf.cli.arguments import take_config
        >>> take_config(["--limit", "2", "--config=recipe.yaml"])
        (['--limit', '2'], 'recipe.yaml')
    """
    rest, paths, at = [], [], 0
    while at < len(args):
        if args[at] == "--config":
            if at + 1 >= len(args) or not args[at + 1] or args[at + 1].startswith("--"):
                raise ValueError("--config needs a YAML file")
            paths.append(args[at + 1])
            at += 2
            continue
        if args[at].startswith("--config="):
            if not args[at].partition("=")[2]:
                raise ValueError("--config needs a YAML file")
            paths.append(args[at].partition("=")[2])
        else:
            rest.append(args[at])
        at += 1
    if len(paths) > 1:
        raise ValueError(f"--config given {len(paths)} times ({', '.join(paths)}): pass one YAML file "
                         "(flags on the command line override its values)")
    return rest, (paths[0] if paths else None)


def read_config(path: str) -> dict:
    """The mapping in the YAML file `path`, its `env:` block applied to `os.environ` and removed.

    Raises:
        ValueError: the file is not YAML (one line: where and what; undecodable bytes too), not a
            mapping, or its `env` is not a mapping of names to strings or numbers (a null
            value is refused: it would set the variable to "None"); `path` is a folder.
        FileNotFoundError: no such file.
    """
    import yaml

    if os.path.isdir(path):
        raise ValueError(f"--config {path} is a folder: pass a YAML file")
    with open(path, "rb") as handle:  # bytes: PyYAML decodes them (UTF-8/16) and names a bad one as a YAML error
        try:
            values = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must contain a YAML mapping of flag names to values")
    env = values.pop("env", None) or {}  # `env:` with every entry commented out is YAML null: none
    if not isinstance(env, dict):
        raise ValueError(f"{path}: `env` must be a mapping of variable names to values")
    for name, value in env.items():  # null became the string "None" in the environment
        if not isinstance(value, (str, int, float)):
            shown = "null" if value is None else repr(value)
            raise ValueError(f"{path}: `env` variable {name} is {shown}: give it a string or number, or leave it out")
    os.environ.update({str(k): str(v) for k, v in env.items()})
    return values


def _expected(action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(map(str, action.choices))
    if action.type is string_to_bool:
        return "true or false"
    name = getattr(action.type, "__name__", "value")
    return {"int": "an integer", "float": "a number", "str": "a string"}.get(name, name)


def config_value(action, key: str, value: Any, source: str) -> Any:
    """YAML `value` of `key` read as the flag `action` reads its text: the same conversions and
    checks as on the command line (`limit: 1.5` is refused as `--limit 1.5` is); a list only
    for a flag that takes several values; null (`private:` left empty too) kept only where the
    field takes None (`action.nullable`, set by `CommandParser`), refused elsewhere.

    Raises:
        ValueError: one line naming `source`, the key, what it takes and what it got.
    """
    if value is None and not getattr(action, "nullable", True):
        _refuse(action, key, value, source)
    if value is None or action.type is None:
        return value
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict) or any(isinstance(item, (list, dict)) for item in items):
            _refuse(action, key, value, source)
        one = copy(action)
        one.nargs = None
        return [config_value(one, key, item, source) for item in items]
    if isinstance(value, (list, dict)) or (isinstance(value, bool) and action.type is not string_to_bool):
        _refuse(action, key, value, source)
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        _refuse(action, key, value, source)
    if action.choices is not None and converted not in action.choices:
        _refuse(action, key, value, source)
    return converted


def _refuse(action, key: str, value: Any, source: str):
    several = " (a list of them)" if action.nargs == "+" else ""
    got = "null (an empty value)" if value is None else repr(value)
    raise ValueError(f"{source}: `{key}` takes {_expected(action)}{several}, got {got}")
