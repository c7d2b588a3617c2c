"""How a compression method declares its options: a frozen dataclass derived from ``MethodOptions`` whose
fields are made with ``option()``. Torch-free.

Each method defines its dataclass in its own module (``offline/methods/<method>.py``) and names it as its
class's ``Options``; the command line builds ``moe-compress compress``'s per-method arguments from these fields
(offline/option_args.py: help, choices and defaults come from here), and ``record()`` is what the checkpoint
keeps in ``quantization_config.method_options`` (docs/format.md).

Field conventions: ``option(default, help, ...)`` gives a field its help text; the command-line flag is
``--`` + the class's ``flag_prefix`` + the field name with dashes, unless ``flag`` says otherwise. A field
whose value is itself an options dataclass is expanded into one flag per sub-field (``MIOptions``), or read as
one flag with a value per sub-field when ``flag`` is given (``ACIWeights``). Values are checked in
``__post_init__`` (ValueError, with the ``check_*`` helpers below), so a bad value is refused before any model
is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar


def option(default: Any, help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None,
           cli: bool = True, from_arg: str | None = None) -> Any:
    """A dataclass field with its command-line description. ``cli=False``: not on the command line;
    ``from_arg``: taken from that general argument of the run (e.g. ``seed``) instead of a flag of its own."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "cli": cli,
                                            "from_arg": from_arg})


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def check_range(value: float, low: float, high: float, what: str, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{what} must be in [{low:g}, {high:g}{')' if high_open else ']'}, got {value}")


def check_positive(value: int, what: str) -> None:
    if value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value}")


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; a method without options uses it as is (``svd``, ``whitened-svd``)."""

    flag_prefix: ClassVar[str] = ""

    def record(self) -> dict:
        """What quantization_config.method_options records (docs/format.md)."""
        return asdict(self)
