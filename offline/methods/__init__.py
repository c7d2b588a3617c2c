"""Compression methods, by ``--method`` name: the one registry of methods.

Each entry names a method's options dataclass (offline/method_options.py, torch-free) and where its class is;
the class's module is imported only when the method is built, so the command line reads the methods' names and
options (``moe-compress --help``, argument checks) without importing torch. Adding a method: its module here,
its options dataclass, and one line in ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import import_module

from ..method_options import BasisOptions, D2Options, MethodOptions, RFIDOptions, RSOptions


@dataclass(frozen=True)
class Method:
    """A registered method: its options and its class, ``module.ClassName`` below offline/methods/."""

    options: type[MethodOptions]
    implementation: str

    def load(self) -> type:
        """The method's class (imports its module, and so torch)."""
        module, class_name = self.implementation.rsplit(".", 1)
        return getattr(import_module(f"{__name__}.{module}"), class_name)


METHODS: dict[str, Method] = {
    "d2": Method(D2Options, "d2.D2MoE"),
    "mobe": Method(BasisOptions, "mobe.MoBE"),
    "rfid": Method(RFIDOptions, "rfid.RFIDMoE"),
    "rs": Method(RSOptions, "rs.RSMoE"),
    "svd": Method(MethodOptions, "svd.PlainSVD"),
    "whitened-svd": Method(MethodOptions, "svd.WhitenedSVD"),
}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def options_for(method: str, **values) -> MethodOptions:
    """``method``'s options from keyword ``values``, refusing a field that belongs to another method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    options = METHODS[method].options
    for name in values:
        if name not in _field_names(options):
            owners = [m for m, entry in METHODS.items() if name in _field_names(entry.options)]
            if not owners:
                raise ValueError(f"{name!r} is not an option of any method")
            raise ValueError(f"{name!r} is an option of {', '.join(owners)}, not of method {method}")
    return options(**values)
