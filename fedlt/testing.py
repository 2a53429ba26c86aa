"""A conformance suite for plugin authors: ``check_plugin(MyPlugin, params)`` in your own tests.

In the spirit of scikit-learn's ``check_estimator``: it runs your plugin in small real runs and
fails, naming the check, when it breaks the contract:

1. **registration**: the class validates (hook names, arguments, ``@hookimpl`` marks) and its
   ``Params`` accept the parameters;
2. **fresh client instances and checked results**: a run trains with it on the serial engine,
   where every client-round gets a fresh instance and every hook result is checked on arrival
   (shapes, scalar losses, plain-data payloads, configs and state);
3. **state round-trips**: its global ``state_dict()`` and every client's ``state`` are plain data
   that survive ``torch.save`` / ``torch.load(weights_only=True)`` unchanged, and
   ``load_state_dict(state_dict())`` on a fresh instance gives the same state back;
4. **resume == uninterrupted**: a run interrupted after round 1 and resumed ends with the same
   weights, states and metrics as one that was not;
5. **serial == Ray** (when Ray is installed and ``"ray"`` is in ``engines``): the same run on the
   Ray engine gives the same weights, states and metrics bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["PluginCheckError", "check_plugin"]

#: The default scenario: long-tailed digits, 4 clients, 3 rounds, half the clients per round.
TINY: dict[str, Any] = {
    "name": "check-plugin",
    "seed": 3,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 10},
    "partition": {"kind": "dirichlet", "n_clients": 4, "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
    "federation": {"rounds": 3, "fraction_clients": 0.5, "eval_every": 1},
    "eval": {"shot_rule": "count", "shot_thresholds": [60, 20]},
    "engine": {"threads": 1},
}


class PluginCheckError(AssertionError):
    """A conformance check failed; the message names the check and what differed."""


@contextmanager
def _registered(name: str, cls: type | None) -> Iterator[None]:
    """Make ``cls`` discoverable as ``name`` here and in worker processes (via the environment)."""
    from fedlt.hooks.discovery import EXTRA_PLUGINS_ENV

    if cls is None:
        yield
        return
    before = os.environ.get(EXTRA_PLUGINS_ENV)
    entry = f"{name}={cls.__module__}:{cls.__qualname__}"
    os.environ[EXTRA_PLUGINS_ENV] = ",".join(filter(None, [before, entry]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(EXTRA_PLUGINS_ENV, None)
        else:
            os.environ[EXTRA_PLUGINS_ENV] = before


def _same(a: Any, b: Any, where: str) -> str | None:
    """Where two plain trees differ (tensors bit for bit), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        return None if ok and torch.equal(a, b) else f"{where} differs"
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            return f"{where} has different keys"
        for k in a:
            problem = _same(a[k], b[k], f"{where}[{k!r}]")
            if problem:
                return problem
        return None
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return f"{where} has a different length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            problem = _same(x, y, f"{where}[{i}]")
            if problem:
                return problem
        return None
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _ckpt(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _fail(check: str, problem: str) -> PluginCheckError:
    return PluginCheckError(f"check_plugin [{check}]: {problem}")


def check_plugin(
    plugin: type | str,
    params: Mapping[str, Any] | None = None,
    *,
    scenario: Mapping[str, Any] | None = None,
    engines: Sequence[str] = ("serial", "ray"),
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Run the conformance checks on one plugin; raise :class:`PluginCheckError` on the first failure.

    Parameters
    ----------
    plugin : Plugin subclass or str
        The plugin class (registered for the checks under ``plugin.name`` or its class name in
        lowercase-hyphen form; worker processes import it by module and name) or the name of an
        installed plugin.
    params : mapping, optional
        The plugin's parameters for the runs.
    scenario : mapping, optional
        The scenario to run (default: long-tailed digits, 4 clients, 3 rounds); the plugin is put
        first in its ``plugins`` list. Use a continual scenario for stream plugins.
    engines : sequence of str, default=("serial", "ray")
        ``"ray"`` adds the serial == Ray check when Ray is installed (skipped otherwise, noted in
        the report).
    out : path, optional
        Where to keep the runs (default: a temporary folder, removed afterwards).

    Returns
    -------
    dict
        ``{"checks": [names passed], "skipped": [notes], "final": final metrics}``.
    """
    import fedlt
    from fedlt.driver.runner import Run
    from fedlt.hooks.discovery import PluginInfo, discover_plugins, instantiate_plugins
    from fedlt.hooks.plugin import Plugin, implementations

    report: dict[str, Any] = {"checks": [], "skipped": []}
    if isinstance(plugin, str):
        name, cls = plugin, None
        info = discover_plugins().get(name)
        if info is None or info.error:
            raise _fail(
                "registration", f"plugin {name!r} is not installed or unusable: {info and info.error}"
            )
        plugin_cls = info.cls
    else:
        if not (isinstance(plugin, type) and issubclass(plugin, Plugin)):
            raise _fail("registration", f"{plugin!r} is not a fedlt.Plugin subclass")
        cls = plugin_cls = plugin
        name = getattr(plugin, "name", "") or _hyphen(plugin.__name__)

    # 1. registration
    implementations(plugin_cls, name)
    spec = {"name": name, **dict(params or {})}
    base = copy.deepcopy(dict(scenario) if scenario is not None else TINY)
    base["plugins"] = [spec, *base.get("plugins", [])]
    base.setdefault("engine", {})["threads"] = 1
    resolved = fedlt.load_scenario(base)
    instances = instantiate_plugins(
        resolved.plugins[:1], {name: PluginInfo(name, "check", "check", plugin_cls)}
    )
    report["checks"].append("registration")

    threads = torch.get_num_threads()
    tmp = tempfile.TemporaryDirectory(prefix="fedlt-check-") if out is None else None
    root = Path(tmp.name if tmp is not None else out)
    try:
        with _registered(name, cls):
            # 2. a serial run: fresh instances, checked results (the dispatcher raises on mistakes)
            summary = fedlt.run(base, out=root / "serial")
            report["final"] = summary["final"]
            report["checks"].append("fresh instances and checked results")

            # 3. state round-trips
            ckpt = _ckpt(root / "serial")
            buffer = io.BytesIO()
            torch.save({"plugins": ckpt["plugins"], "clients": ckpt["client_states"]}, buffer)
            buffer.seek(0)
            back = torch.load(buffer, weights_only=True)
            problem = _same(ckpt["client_states"], back["clients"], "client state")
            problem = problem or _same(ckpt["plugins"], back["plugins"], "state_dict()")
            fresh = instances[0].__class__(instances[0].params)
            fresh.load_state_dict(ckpt["plugins"][name])
            problem = problem or _same(
                fresh.state_dict(), ckpt["plugins"][name], "load_state_dict(state_dict())"
            )
            if problem:
                raise _fail("state round-trip", problem)
            report["checks"].append("state round-trip")

            # 4. resume == uninterrupted
            class _Stop(Exception):
                pass

            def stop(r: int, record: Any) -> None:
                if r == 1:
                    raise _Stop

            run = Run.create(resolved, root / "resumed")
            run.on_round = stop
            with contextlib.suppress(_Stop):
                run.execute()
            resumed = fedlt.resume(root / "resumed")
            problem = _compare_runs(summary, ckpt, resumed, _ckpt(root / "resumed"))
            if problem:
                raise _fail("resume == uninterrupted", problem)
            report["checks"].append("resume == uninterrupted")

            # 5. serial == Ray
            if "ray" in engines:
                import importlib.util

                if importlib.util.find_spec("ray") is None:
                    report["skipped"].append("serial == Ray: Ray is not installed")
                else:
                    on_ray = copy.deepcopy(base)
                    on_ray["engine"] = {**on_ray.get("engine", {}), "kind": "ray", "threads": 1}
                    ray_summary = fedlt.run(on_ray, out=root / "ray")
                    problem = _compare_runs(summary, ckpt, ray_summary, _ckpt(root / "ray"))
                    if problem:
                        raise _fail("serial == Ray", problem)
                    report["checks"].append("serial == Ray")
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
    return report


def _compare_runs(
    a: dict[str, Any], a_ckpt: dict[str, Any], b: dict[str, Any], b_ckpt: dict[str, Any]
) -> str | None:
    for key in ("global", "client_states", "plugins"):
        problem = _same(a_ckpt[key], b_ckpt[key], key)
        if problem:
            return problem
    fa = {k: v for k, v in a["final"].items()}
    fb = {k: v for k, v in b["final"].items()}
    return _same(fa, fb, "final metrics")


def _hyphen(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("-")
        out.append(ch.lower())
    return "".join(out)
