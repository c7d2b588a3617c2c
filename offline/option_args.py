"""Command-line flags from the methods' options dataclasses (each method class's ``Options``, declared as
offline/options.py describes), and options back from the parsed arguments.

Every command-line field of every method's options becomes one flag; a field several methods share (MoBE's
and RFID-MoE's ``--group-size``) becomes one flag owned by all of them. Help, choices, type and default come from
the field; the help groups are titled by the first docstring line of the class that defines the field. Flags are
added without a default (``argparse.SUPPRESS``), so the parsed arguments hold only what was given:
``options_from_args`` refuses a flag that belongs to another method and takes the rest from the dataclass
defaults. Reading the dataclasses imports the method modules, and so torch: the command line adds these flags
only to a ``compress`` command (offline/cli.py).
"""

from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, fields, is_dataclass, replace

from .methods import METHODS, method_class
from .options import MethodOptions


@dataclass(frozen=True)
class Flag:
    """One command-line flag of the methods' options."""

    flag: str
    path: tuple[str, ...]     # field names from the method's options down, e.g. ("mi", "steps")
    owners: tuple[str, ...]   # the methods that take it
    group: type               # the options class that defines the (top-level) field
    spec: Field

    @property
    def dest(self) -> str:
        return "option:" + self.flag[2:]


def _defining_class(cls: type, name: str) -> type:
    return next(c for c in reversed(cls.__mro__) if name in vars(c).get("__annotations__", {}))


def _leaves(cls: type, prefix: str, path: tuple[str, ...] = (), group: type | None = None):
    """(flag, path, field, group) of every command-line field of ``cls``, nested option classes expanded."""
    for f in fields(cls):
        if not f.metadata.get("cli", True) or f.metadata.get("from_arg"):
            continue
        here, where = path + (f.name,), group or _defining_class(cls, f.name)
        name = f.name.replace("_", "-")
        if is_dataclass(f.default) and not f.metadata.get("flag"):
            yield from _leaves(type(f.default), f"{prefix}{name}-", here, where)
        else:
            yield f.metadata.get("flag") or f"--{prefix}{name}", here, f, where


def method_flags() -> dict[str, Flag]:
    """Every method option's flag, by flag."""
    found: dict[str, Flag] = {}
    for method in METHODS:
        cls = method_class(method).Options
        for flag, path, spec, group in _leaves(cls, cls.flag_prefix):
            if flag not in found:
                found[flag] = Flag(flag, path, (method,), group, spec)
            elif (found[flag].path, found[flag].group) == (path, group):
                found[flag] = replace(found[flag], owners=found[flag].owners + (method,))
            else:
                raise AssertionError(f"{flag} names two different options ({found[flag].group.__name__}, "
                                     f"{group.__name__})")
    return found


def _argparse_kwargs(spec: Field) -> dict:
    default, help_text = spec.default, spec.metadata["help"].replace("%", "%%")
    if isinstance(default, bool):
        return {"action": "store_true", "help": help_text}
    if is_dataclass(default):  # one value per sub-field, e.g. --rs-aci W_MEAN W_VAR W_PEAK GAMMA
        values = [getattr(default, f.name) for f in fields(default)]
        return {"nargs": len(values), "type": type(values[0]), "metavar": tuple(f.name.upper() for f in fields(default)),
                "help": f"{help_text} (default {' '.join(map(str, values))})"}
    kwargs = {"type": type(default), "help": f"{help_text} (default {default})"}
    if spec.metadata.get("choices"):
        kwargs["choices"] = spec.metadata["choices"]
    return kwargs


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    """Add every method's options to ``parser``, one argument group per options class."""
    groups = {}  # options class -> its argument group
    for flag in method_flags().values():
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group.__doc__.strip().splitlines()[0])
        kwargs = _argparse_kwargs(flag.spec)
        if "type" in kwargs and "choices" not in kwargs and "metavar" not in kwargs:
            kwargs["metavar"] = flag.flag[2:].upper().replace("-", "_")
        groups[flag.group].add_argument(flag.flag, dest=flag.dest, default=argparse.SUPPRESS, **kwargs)


def options_from_args(method: str, args: argparse.Namespace) -> MethodOptions:
    """``method``'s options from the parsed arguments; ValueError (one line) for a flag of another method."""
    given = {flag.path: flag for flag in method_flags().values() if hasattr(args, flag.dest)}
    for flag in given.values():
        if method not in flag.owners:
            raise ValueError(f"{flag.flag} is an option of --method {' / '.join(flag.owners)}, not of --method {method}")
    return _with_args(method_class(method).Options(), (), given, args)


def _with_args(options, path: tuple[str, ...], given: dict[tuple[str, ...], Flag], args: argparse.Namespace):
    changes = {}
    for f in fields(options):
        here, value = path + (f.name,), getattr(options, f.name)
        if here in given:
            parsed = getattr(args, given[here].dest)
            changes[f.name] = type(value)(*parsed) if is_dataclass(value) else parsed
        elif f.metadata.get("from_arg"):
            changes[f.name] = getattr(args, f.metadata["from_arg"])
        elif is_dataclass(value):
            changes[f.name] = _with_args(value, here, given, args)
    return replace(options, **changes)
