"""Optional dependencies, imported on demand with an error that names the ``pip install`` that brings them.

The core needs only torch, numpy and a few file-format libraries; training reports, plots and the server come in
extras (``laformer[train]``, ``laformer[serve]``), so a missing one must say which extra to install instead of
surfacing a raw ``ModuleNotFoundError`` from deep inside a command.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from laformer.errors import LaFormerError


class MissingExtraError(LaFormerError, ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that fixes it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ``MissingExtraError`` naming ``pip install "laformer[extra]"``.

    ``purpose`` completes "... needs <module>": e.g. ``require("fastapi", "serve", "laformer serve")``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise MissingExtraError(
            f"{purpose} needs the optional package {missing!r}, which is not installed; "
            f'install it with: pip install "laformer[{extra}]"'
        ) from exc
