"""Plain data: what may cross a process boundary or land in a checkpoint without running code.

Plugin state (per client and global), ``client_end`` payloads and round configs are limited to
*plain trees*: ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``torch.Tensor``, and
``list`` / ``tuple`` / ``dict`` of them (dict keys ``str`` or ``int``). Such trees load with
``torch.load(weights_only=True)`` and travel over Flower as records, so nobody ever unpickles
another party's objects. :func:`find_unsafe` says where a tree breaks the rule;
:func:`encode_tree` / :func:`decode_tree` turn a tree into JSON plus a list of tensors and back.
"""

from __future__ import annotations

import json
from typing import Any

import torch

__all__ = ["PLAIN_TYPES", "decode_tree", "describe_type", "encode_tree", "find_unsafe"]

#: Leaf types allowed in a plain tree (besides tensors).
PLAIN_TYPES = (type(None), bool, int, float, str, bytes)

_ALLOWED = "tensors, numbers, strings, bytes, None, and lists, tuples or dicts (str/int keys) of them"


def describe_type(value: Any) -> str:
    """``numpy.ndarray``-style name of a value's type, for messages."""
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def find_unsafe(tree: Any, path: str = "value") -> str | None:
    """``None`` when ``tree`` is a plain tree, else a sentence naming the first offending element.

    >>> find_unsafe({"w": torch.zeros(2), "n": [1, 2.5, "x"]}) is None
    True
    >>> find_unsafe({"f": lambda: 0}, "state")
    "state['f'] is a function; allowed: tensors, numbers, strings, bytes, None, and lists, ..."
    """
    stack = [(tree, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
                return f"{where} is a tensor subclass {describe_type(value)}; allowed: {_ALLOWED}"
            continue
        if type(value) in PLAIN_TYPES:
            continue
        if type(value) in (list, tuple):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
            continue
        if type(value) is dict:
            for key in reversed(list(value)):
                if type(key) not in (str, int):
                    kind = describe_type(key)
                    return f"{where} has a key {key!r} of type {kind}; dict keys must be str or int"
                stack.append((value[key], f"{where}[{key!r}]"))
            continue
        kind = (
            "a function" if callable(value) and not isinstance(value, type) else f"a {describe_type(value)}"
        )
        return f"{where} is {kind}; allowed: {_ALLOWED}"
    return None


def encode_tree(tree: Any) -> tuple[str, list[torch.Tensor]]:
    """A plain tree as (JSON text, tensors in order of appearance); inverse of :func:`decode_tree`.

    Raises ``TypeError`` for anything :func:`find_unsafe` rejects.
    """
    tensors: list[torch.Tensor] = []

    def enc(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors.append(value.detach().cpu())
            return {"T": len(tensors) - 1}
        if value is None or type(value) in (bool, int, str):
            return value
        if type(value) is float:
            return {"f": repr(value)}  # exact, and inf/nan without JSON extensions
        if type(value) is bytes:
            return {"b": value.hex()}
        if type(value) is list:
            return [enc(v) for v in value]
        if type(value) is tuple:
            return {"t": [enc(v) for v in value]}
        if type(value) is dict:
            return {"d": [[k, enc(v)] for k, v in value.items()]}
        raise TypeError(find_unsafe(value) or f"cannot encode {describe_type(value)}")

    problem = find_unsafe(tree)
    if problem is not None:
        raise TypeError(problem)
    return json.dumps(enc(tree), separators=(",", ":")), tensors


def decode_tree(text: str, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the tree :func:`encode_tree` encoded. Only builds plain values, never runs code."""

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            ((tag, body),) = value.items()
            if tag == "T":
                return tensors[int(body)]
            if tag == "f":
                return float(body)
            if tag == "b":
                return bytes.fromhex(body)
            if tag == "t":
                return tuple(dec(v) for v in body)
            if tag == "d":
                out = {}
                for key, v in body:
                    if type(key) not in (str, int):
                        raise ValueError(f"bad dict key {key!r} in an encoded tree")
                    out[key] = dec(v)
                return out
            raise ValueError(f"unknown tag {tag!r} in an encoded tree")
        if value is None or type(value) in (bool, int, str):
            return value
        raise ValueError(f"unexpected {describe_type(value)} in an encoded tree")

    return dec(json.loads(text))
