"""Lazy package faces: a package lists its public names and the private module of each, and a
name's module is imported on first use (PEP 562), as the package root does.

Why: importing ``pteenet.training._config`` (or ``pteenet.runtime``) must not pull in torch
through its package's ``__init__``, so ``pteenet --help`` and the torch-free runtime stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(package: str, names: Mapping[str, str]
              ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public ``names`` live in the
    given submodules (``{"TrainConfig": "_config"}``; a name mapped to itself is that
    submodule)."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{names[name]}")
        value = module if names[name] == name else getattr(module, name)  # a subpackage itself
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
