"""Warnings that point at the user's code, not at fedlt's.

``warnings.warn`` shows the file and source line ``stacklevel`` frames up. fedlt's warnings are
raised at varying depths below the user's call (``fedlt.run`` -> ``Run.create`` -> ``claim`` ->
...), so a fixed ``stacklevel`` lands inside fedlt and shows the user one of fedlt's source lines.
:func:`warn` walks up to the first frame outside the package instead (what Python 3.12's
``skip_file_prefixes`` does), so ``fedlt.run(...)`` in a script names the script's line; the
command line prints warnings as one paragraph without any source line (``fedlt.cli``).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

__all__ = ["user_stacklevel", "warn"]

_PACKAGE = str(Path(__file__).resolve().parents[1])


def user_stacklevel(skip: int = 1) -> int:
    """The ``stacklevel`` that names the first frame outside fedlt, for a ``warnings.warn`` made
    by the function ``skip`` frames up from here (1: the caller of this function warns itself).

    ``stacklevel=k`` names the frame ``sys._getframe(k)`` of this function, so frames are counted
    from there until one is not fedlt's (at the top of the stack, past it: the command line).
    """
    level = skip
    frame = sys._getframe(level)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the user's code (see the module docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel(2))
