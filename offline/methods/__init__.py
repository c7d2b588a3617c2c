"""Compression methods, by ``--method`` name: the one registry of methods.

Each entry names where a method's class is (``module.ClassName`` below offline/methods/); the class carries its
options dataclass as ``Options``, defined in the same module. A method's module imports torch, so it is imported
only when the method is needed: building ``moe-compress compress``'s arguments or the method itself
(``method_class``); the names alone (``--method``'s choices, every other command) import no module. Adding a
method: its module here (the class, its ``Options``) and one line in ``METHODS`` (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import fields
from importlib import import_module

METHODS: dict[str, str] = {
    "d2": "d2.D2MoE",
    "mobe": "mobe.MoBE",
    "rfid": "rfid.RFIDMoE",
    "rs": "rs.RSMoE",
    "svd": "svd.PlainSVD",
    "whitened-svd": "svd.WhitenedSVD",
}


def method_class(method: str) -> type:
    """The class of ``method`` (imports its module, and so torch); ValueError for an unknown name."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    module, class_name = METHODS[method].rsplit(".", 1)
    return getattr(import_module(f"{__name__}.{module}"), class_name)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def options_for(method: str, **values):
    """``method``'s options from keyword ``values``, refusing a field that belongs to another method."""
    options = method_class(method).Options
    for name in values:
        if name not in _field_names(options):
            owners = [m for m in METHODS if name in _field_names(method_class(m).Options)]
            if not owners:
                raise ValueError(f"{name!r} is not an option of any method")
            raise ValueError(f"{name!r} is an option of {', '.join(owners)}, not of method {method}")
    return options(**values)
