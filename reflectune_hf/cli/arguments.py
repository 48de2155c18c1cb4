"""How the job configs become command lines: dataclass fields as flags (`--oracle_model` or
`--oracle-model`) and `--config file.yaml`, in the manner of TRL's `TrlParser`, with help that
reads well.

- `CommandParser` reads the package's own config dataclasses with the standard library only:
  building it (`reflectune estimate --help`, `reflectune --help`) imports neither TRL nor
  transformers nor torch. `trl_command_parser` is the same help layout over TRL's `TrlParser`,
  for the training commands whose arguments are TRL's and transformers' dataclasses.
- Flags are grouped by what they configure: a config mixin names its group in a `help_group`
  class attribute (`data`, `oracle`, `student`, `selection`, `output` ...); a class attribute
  `help_groups = {field: group}` places single fields.
- A negated flag (`--no_private` for a field that defaults to True) says what it does: the text
  in a class attribute `negated_help = {field: text}`, else "set --<field> to false".
  These are class attributes, not field metadata, so plain `TrlParser` / `HfArgumentParser`
  still parse the same dataclasses.
- A default is printed once: not when the help text already speaks of it, not for `None`.
- A flag or `--config` key the command does not take is refused (`UnknownArguments`, a
  `ValueError` naming them) rather than ignored; so is an abbreviated flag (`--top_frac`).
- The `--config` file (`--config FILE` or `--config=FILE`, once) is read by `config_file`: each
  value converted and checked as its flag's text is, a broken file named in one line.
- `first_group(parser, title, helps)` moves chosen flags of a large parser (TRL's hundreds of
  training arguments) into a group shown first.

Example:
    >>> from dataclasses import dataclass, field
    >>> from reflectune_hf.cli.arguments import CommandParser
    >>> @dataclass
    ... class Push:
    ...     help_group = "output"
    ...     negated_help = {"private": "make the pushed repo public"}
    ...     private: bool = field(default=True, metadata={"help": "make the pushed repo private"})
    >>> parser = CommandParser((Push,), prog="demo")
    >>> text = parser.format_help()
    >>> "output:" in text and "make the pushed repo public" in text
    True
    >>> parser.parse_args_and_config(["--no_private"])
    (Push(private=False),)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import types
import typing
from copy import copy
from typing import Literal, Optional, Union, get_type_hints

from .config_file import config_value, read_config, string_to_bool, take_config

CONFIG_HELP = "a YAML file with the same keys as the flags; flags given on the command line override it"


class UnknownArguments(ValueError):
    """Flags (or `--config` keys) a command does not take: `names` (field names), `source` (where
    they came from: "the command line" or the YAML file)."""

    def __init__(self, prog: str, names: list[str], source: str):
        self.names, self.source = names, source
        what = ", ".join(f"--{n}" for n in names)
        where = "" if source == "the command line" else f" (in {source})"
        verb = "is not a flag" if len(names) == 1 else "are not flags"
        super().__init__(f"{what}{where} {verb} of {prog}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; `(default: X)` added once, only where the help does not speak of
    the default already and X says something (not `None`, not on a negated flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings
                or isinstance(action, (argparse._StoreFalseAction, argparse._HelpAction))):
            return text
        return f"{text} (default: %(default)s)"


def _class_dict(dtype, attribute: str) -> dict:
    """`attribute` (a dict) merged over `dtype`'s hierarchy, subclasses winning."""
    merged = {}
    for cls in reversed(dtype.__mro__):
        merged.update(cls.__dict__.get(attribute) or {})
    return merged


def _owner(dtype, name: str):
    """The class of `dtype`'s hierarchy that declares field `name`."""
    return next((c for c in dtype.__mro__ if name in c.__dict__.get("__annotations__", {})), dtype)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _none_or(inner):
    """`inner`, with 'none' / 'null' read as None (for `Optional[int]` and the like)."""

    def parse(value: str):
        return None if value.lower() in ("none", "null") else inner(value)

    parse.__name__ = getattr(inner, "__name__", "value")  # argparse names the type in its errors
    return parse


class _GroupedHelp:
    """The help layout shared by `CommandParser` and `trl_command_parser`'s class: flags in the
    groups their config classes name, worded negated flags, `--config` listed."""

    def _group(self, title):
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title)
        return self._groups[title]

    def _add_dataclass_arguments(self, dtype):
        if hasattr(dtype, "_argument_group_name"):  # TRL's / transformers' own grouping
            return super()._add_dataclass_arguments(dtype)
        hints = get_type_hints(dtype)
        groups, negated = _class_dict(dtype, "help_groups"), _class_dict(dtype, "negated_help")
        for field in dataclasses.fields(dtype):
            if not field.init:
                continue
            title = groups.get(field.name) or getattr(_owner(dtype, field.name), "help_group", None)
            target = self._group(title) if title else self
            typed = copy(field)
            typed.type = hints[field.name]
            before = len(self._actions)
            self._parse_dataclass_field(target, typed)
            for action in self._actions[before:]:
                if isinstance(action, argparse._StoreFalseAction):
                    action.help = negated.get(field.name) or f"set --{field.name} to false"
                    action._worded = 1

    def _finish_help(self):
        # Only shown in the help: `parse_args_and_config` takes `--config FILE` out of argv first.
        self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
        for action in self._actions:  # negated flags of classes we do not own (TRL's) say what they do too
            if isinstance(action, argparse._StoreFalseAction) and action.help and not getattr(action, "_worded", 0):
                action.help = f"set --{action.dest} to false"


class CommandParser(_GroupedHelp, argparse.ArgumentParser):
    """The command line of a config dataclass of this package: grouped flags, worded negated
    flags, one default per flag, `--config` in the help; standard library only.

    Fields may be `str`, `int`, `float`, `bool`, `Literal[...]`, `Optional` of those, or a
    `list` of one of them; TRL's and transformers' dataclasses go to `trl_command_parser`.
    Parsing is `parse_args_and_config(argv)`, as `TrlParser`'s: a `--config` YAML file sets the
    defaults (its `env:` mapping the environment), flags override it; a flag or key the config
    does not have raises `UnknownArguments`.
    """

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("usage", "%(prog)s [-h] [--config FILE] [--flag value ...]")
        kwargs.setdefault("allow_abbrev", False)  # `--learning_rat` is a typo, not --learning_rate
        self._groups = {}
        super().__init__(**kwargs)
        self.dataclass_types = [dataclass_types] if dataclasses.is_dataclass(dataclass_types) else list(dataclass_types)
        for dtype in self.dataclass_types:
            if "config" in {f.name for f in dataclasses.fields(dtype)}:
                raise ValueError(f"{dtype.__name__} has a field named 'config', the flag of the YAML file")
            self._add_dataclass_arguments(dtype)
        self._finish_help()

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        """One field as a flag (and `--no_<field>` for a bool that defaults to True), the way
        `HfArgumentParser` spells them."""
        options = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        kwargs = {"help": field.metadata.get("help")}
        kind, optional = field.type, False
        if typing.get_origin(kind) in (Union, types.UnionType):
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(args) != 1 or len(typing.get_args(kind)) != 2:
                raise TypeError(f"field {field.name!r}: only Optional[X] unions can be flags, got {kind}")
            kind, optional = args[0], True
        if field.default is not dataclasses.MISSING:
            kwargs["default"] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            kwargs["default"] = field.default_factory()
        else:
            kwargs["required"] = True
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            by_text = {str(c): c for c in choices}
            kwargs.update(choices=choices, type=lambda text: by_text.get(text, text))
        elif kind is bool:
            kwargs.update(type=string_to_bool, nargs="?", const=True, metavar="{true,false}")
            kwargs.setdefault("default", False)
            kwargs.pop("required", None)
        elif typing.get_origin(kind) is list and len(typing.get_args(kind)) == 1:
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        elif kind in (str, int, float):
            kwargs["type"] = _none_or(kind) if optional and kind is not str else kind
        else:
            raise TypeError(f"field {field.name!r} of type {kind} is not a flag CommandParser reads "
                            "(TRL's and transformers' dataclasses: use trl_command_parser)")
        action = parser.add_argument(*options, **kwargs)
        action.nullable = optional  # a `--config` null is a value only where the field takes None
        if kind is bool and field.default is True:  # after the flag itself: the same destination
            parser.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                                dest=field.name, default=False, help=field.metadata.get("help"))

    def set_defaults_with_config(self, source: str = "the config", **values) -> list[str]:
        """Make `values` (field name -> value, read as `config_value` reads them) the defaults;
        returns the names no field takes."""
        fields = self._field_names()
        actions = [a for a in self._actions if a.dest in fields and a.dest in values]
        converted = {a.dest: config_value(a, a.dest, values[a.dest], source) for a in actions if a.type is not None}
        for action in actions:
            action.default, action.required = converted.get(action.dest, values[action.dest]), False
        return [name for name in values if name not in fields]

    def parse_args_into_dataclasses(self, args: list[str]) -> tuple:
        """The dataclasses of `args` (flags only; see `parse_args_and_config` for `--config`)."""
        namespace, rest = self.parse_known_args(args)
        flags = [a for a in rest if a.startswith("-") and len(a) > 1 and not _is_number(a)]
        names = [a.lstrip("-").split("=")[0].replace("-", "_") for a in flags]
        single = [(a, n) for a, n in zip(flags, names) if not a.startswith("--") and n in self._field_names()]
        if single:  # `-limit 3`: argparse takes only `--limit`; not a flag of another command
            raise ValueError(", ".join(f"{a.split('=')[0]}: a flag takes two dashes (--{n})" for a, n in single))
        if flags:
            raise UnknownArguments(self.prog, names, "the command line")
        if rest:
            raise ValueError(f"unexpected value{'s' if len(rest) > 1 else ''} {' '.join(rest)!r} on the command line "
                             f"of {self.prog}: every value follows its flag (--name value)")
        values = vars(namespace)
        return tuple(dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values})
                     for dtype in self.dataclass_types)

    def parse_args_and_config(self, args: Optional[list[str]] = None) -> tuple:
        """The config dataclasses from `args` (default `sys.argv[1:]`) and their `--config` file.

        Raises:
            ValueError: a bad value, a `--config` file that is not a YAML mapping, or a flag or
                key the config does not have (`UnknownArguments`).
            FileNotFoundError: the `--config` file does not exist.
        """
        args, path = take_config(list(sys.argv[1:] if args is None else args))
        if path is not None:
            values = read_config(path)
            unknown = self.set_defaults_with_config(path, **values)
            spelled = [n for n in unknown if isinstance(n, str) and n.replace("-", "_") in self._field_names()]
            if spelled:
                names = ", ".join(n.replace("-", "_") for n in spelled)
                raise ValueError(f"{path}: the keys are field names: write {names} (not {', '.join(spelled)})")
            if unknown:
                raise UnknownArguments(self.prog, [str(n) for n in unknown], path)
        return self.parse_args_into_dataclasses(args)

    def _field_names(self) -> set:
        return {f.name for dtype in self.dataclass_types for f in dataclasses.fields(dtype) if f.init}


@functools.lru_cache(maxsize=None)
def _trl_parser_class():
    from trl import TrlParser  # imported here: TRL costs a third of a second and only training needs it

    class TrlCommandParser(_GroupedHelp, TrlParser):
        """`TrlParser` (TRL's and transformers' dataclasses) with `CommandParser`'s help layout."""

        def __init__(self, dataclass_types, **kwargs):
            kwargs.setdefault("formatter_class", HelpFormatter)
            kwargs.setdefault("usage", "%(prog)s [-h] [--config FILE] [--flag value ...]")
            kwargs.setdefault("allow_abbrev", False)
            self._groups = {}
            super().__init__(dataclass_types, **kwargs)
            self._finish_help()

        def parse_args_and_config(self, args=None, **kwargs):
            """TRL's parsing, after `--config=FILE` is spelled `--config FILE`, a second `--config`
            refused and the file read once as YAML (one-line errors)."""
            args, path = take_config(list(sys.argv[1:] if args is None else args))
            if path is not None:
                read_config(path)  # the errors of a file that is not a YAML mapping, before TRL's
                args += ["--config", path]
            return super().parse_args_and_config(args, **kwargs)

    return TrlCommandParser


def trl_command_parser(dataclass_types, **kwargs) -> argparse.ArgumentParser:
    """A `TrlParser` over `dataclass_types` (TRL's `SFTConfig`, `ModelConfig` ... and ours) with
    the help layout of `CommandParser`; parsing is TRL's (`parse_args_and_config(argv)`).
    Imports TRL: the training commands use it, the others `CommandParser`."""
    return _trl_parser_class()(dataclass_types, **kwargs)


def first_group(parser: argparse.ArgumentParser, title: str, helps: dict[str, str | None],
                description: str | None = None):
    """Move the flags of fields `helps` (name -> new help text, or None to keep it) into a group
    `title` shown before every other group; parsing is unchanged. Returns the group.

    Example:
        >>> import argparse
        >>> parser = argparse.ArgumentParser(prog="demo")
        >>> _ = parser.add_argument("--b"), parser.add_argument("--a")
        >>> _ = first_group(parser, "ours", {"a": "the flag that matters"})
        >>> text = parser.format_help()
        >>> text.index("ours:") < text.index("  --b B")  # the group comes before argparse's options
        True
    """
    group = parser.add_argument_group(title, description)
    parser._action_groups.remove(group)
    parser._action_groups.insert(0, group)
    for name, text in helps.items():
        for action in [a for a in parser._actions if a.dest == name]:
            for other in parser._action_groups:
                if action in other._group_actions and other is not group:
                    other._group_actions.remove(action)
            group._group_actions.append(action)
            if text is not None and not isinstance(action, argparse._StoreFalseAction):
                action.help = text
    return group
