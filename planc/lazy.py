"""Modules imported on first use.

The plan schema is declared by the strategies (passes/), whose passes need torch; reading a plan
does not. Naming torch through `lazy("torch")` lets `planc --help`, usage errors and plan errors
answer in well under a second (importing torch and transformers takes several), and costs nothing
once torch is loaded: each attribute is looked up in the real module once, then kept.
"""
from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """Stands for the module `name`; the first attribute read imports it."""

    def __getattr__(self, attr: str) -> object:
        value = getattr(importlib.import_module(self.__name__), attr)
        setattr(self, attr, value)
        return value


def lazy(name: str) -> types.ModuleType:
    return LazyModule(name)
