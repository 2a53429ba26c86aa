"""Import the repository's scripts (scenarios/*.py, benchmarks/*.py) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """The module of the script at ``path`` (relative to the repository root or absolute), loaded
    once per test session under ``name`` (default: the file's stem)."""
    path = path if path.is_absolute() else ROOT / path
    name = name or path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module
