"""Merge methods: one module per method, each registering an
:class:`~fedcca.methods.registry.Aligner` (see :mod:`fedcca.methods.registry`).

Importing this package imports every module in it, so every method is registered before any
is looked up; a new method is a new module here and nothing else.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")
