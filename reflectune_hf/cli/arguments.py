"""How the job configs become command lines: TRL's `TrlParser` (flags and `--config file.yaml`)
with help that reads well.

- Flags are grouped by what they configure: a config mixin names its group in a `help_group`
  class attribute (`data`, `oracle`, `student`, `selection`, `output` ...); a class attribute
  `help_groups = {field: group}` places single fields.
- A negated flag (`--no_private` for a field that defaults to True) says what it does: the text
  in a class attribute `negated_help = {field: text}`, else "set --<field> to false".
  These are class attributes, not field metadata, so plain `TrlParser` / `HfArgumentParser`
  still parse the same dataclasses.
- A default is printed once: not when the help text already speaks of it, not for `None`.
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
    >>> text = CommandParser((Push,), prog="demo").format_help()
    >>> "output:" in text and "make the pushed repo public" in text
    True
"""

from __future__ import annotations

import argparse
import dataclasses
from copy import copy
from typing import get_type_hints

from trl import TrlParser

CONFIG_HELP = "a YAML file with the same keys as the flags; flags given on the command line override it"


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


class CommandParser(TrlParser):
    """`TrlParser` with grouped flags, worded negated flags, one default per flag and `--config`
    in the help. Parsing is TrlParser's: `parse_args_and_config(argv)`."""

    def __init__(self, dataclass_types, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("usage", "%(prog)s [-h] [--config FILE] [--flag value ...]")
        self._groups = {}
        super().__init__(dataclass_types, **kwargs)
        # Only shown in the help: TrlParser takes `--config FILE` out of argv before argparse parses it.
        self.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
        for action in self._actions:  # negated flags of classes we do not own (TRL's) say what they do too
            if isinstance(action, argparse._StoreFalseAction) and action.help and not getattr(action, "_worded", 0):
                action.help = f"set --{action.dest} to false"

    def _group(self, title):
        if title not in self._groups:
            self._groups[title] = self.add_argument_group(title)
        return self._groups[title]

    def _add_dataclass_arguments(self, dtype):
        if hasattr(dtype, "_argument_group_name"):
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
