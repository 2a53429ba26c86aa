"""A conformance suite for plugin authors: ``check_plugin(MyPlugin, params)`` in your own tests.

In the spirit of scikit-learn's ``check_estimator`` and ``parametrize_with_checks``: the checks
that apply to a plugin are chosen from what it declares (its hooks, ``vectorized``,
``requires``), each can run as a test of its own, and a failure raises :class:`PluginCheckError`
naming the check. The checks, in order:

1. **registration**: the class validates (hook names, arguments, ``@hookimpl`` marks, the
   plugin contract it declares) and its ``Params`` accept the parameters;
2. **fresh instances and checked results**: a run trains with it on the serial engine, where
   every client-round gets a fresh instance and every hook result is checked on arrival;
3. **self lives where it is read**: nothing a hook sets on ``self`` is read where it does not
   live (a server attribute read by client hooks, a client attribute read by server hooks, a
   client attribute read back in the client's next round), recorded in that run;
4. **state round-trip**: its global ``state_dict()`` and every client's ``state`` are plain data
   that survive ``torch.save`` / ``torch.load(weights_only=True)``, and ``load_state_dict`` on a
   fresh instance gives the same state back;
5. **resume == uninterrupted**: a run interrupted after round 1 and resumed ends with the same
   weights, states and metrics as one that was not;
6. **has an effect**: training with it does not end with the exact weights of training without it
   (evaluation plugins: not the exact metrics; metric plugins: their metrics are recorded);
7. **class weights depend only on the class** (plugins with ``client_class_weights``);
8. **serial == vectorized** (plugins declaring ``vectorized = True``): the same run with
   ``engine.vectorize = "on"`` agrees within float rounding;
9. **serial == Ray** (``"ray"`` in ``engines``, Ray installed, the class importable by workers):
   the same run on the Ray engine is identical bit for bit.

The scenario follows the plugin's ``requires``: a stream for ``"stream"``, a ViT for
``"prompts"``, and a plugin it requires (``"plugin:<name>"``) listed before it.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY", "Check", "PluginCheckError", "check_plugin", "parametrize_with_checks", "plugin_checks"]

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

#: Vectorized against serial: ``|vectorized - serial| <= atol + rtol |serial|`` (docs/vectorized.md).
VECTORIZED_TOL = {"rtol": 1e-4, "atol": 5e-5}

#: Hooks through which a plugin changes training (the weights the run ends with).
_TRAINING_HOOKS = frozenset(
    {
        "data_client_samples",
        "configure_model",
        "server_make_aggregator",
        "server_after_aggregate",
        "client_start",
        "client_configure_training",
        "client_trainable_parameters",
        "client_select_indices",
        "client_stream_batch",
        "client_replay_indices",
        "client_forward",
        "client_transform_logits",
        "client_loss",
        "client_sample_weights",
        "client_class_weights",
        "client_extra_losses",
        "client_after_backward",
        "client_update_memory",
    }
)


class PluginCheckError(AssertionError):
    """A conformance check failed; ``check`` names it and the message says what differed."""

    def __init__(self, check: str, problem: str) -> None:
        self.check = check
        super().__init__(f"check_plugin [{check}]: {problem}")


@dataclass(frozen=True)
class Check:
    """One conformance check of one plugin: call it to run it (raises :class:`PluginCheckError`)."""

    name: str
    session: _Session
    run: Callable[[_Session], None]

    def __call__(self) -> None:
        self.run(self.session)

    def __repr__(self) -> str:
        return f"Check({self.name!r})"


# --------------------------------------------------------------------------- one plugin under check


def _hyphen(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("-")
        out.append(ch.lower())
    return "".join(out)


def _importable(cls: type) -> bool:
    """Whether a worker process can import ``cls`` by module and name."""
    module = sys.modules.get(cls.__module__)
    return "<locals>" not in cls.__qualname__ and getattr(module, cls.__qualname__, None) is cls


class _Session:
    """A plugin under check: its class, parameters and scenario, a folder, and the runs the checks
    share (each made once, on first use)."""

    def __init__(
        self,
        plugin: type | str,
        params: Mapping[str, Any] | None,
        scenario: Mapping[str, Any] | None,
        engines: Sequence[str],
        out: str | Path | None,
    ) -> None:
        from fedlt.hooks.discovery import discover_plugins
        from fedlt.hooks.plugin import Plugin

        if isinstance(plugin, str):
            info = discover_plugins().get(plugin)
            if info is None or info.error:
                raise PluginCheckError(
                    "registration", f"plugin {plugin!r} is not installed or unusable: {info and info.error}"
                )
            self.name, self.cls, self.installed = plugin, info.cls, True
        else:
            if not (isinstance(plugin, type) and issubclass(plugin, Plugin)):
                raise PluginCheckError("registration", f"{plugin!r} is not a fedlt.Plugin subclass")
            self.name = getattr(plugin, "name", "") or _hyphen(plugin.__name__)
            self.cls, self.installed = plugin, False
        self.params = dict(params or {})
        self.engines = tuple(engines)
        self.base = self._scenario(scenario)
        if out is None:
            self.root = Path(tempfile.mkdtemp(prefix="fedlt-check-"))
            atexit.register(shutil.rmtree, self.root, True)
        else:
            self.root = Path(out)
        self._runs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self.tracer: Any = None
        self.skipped: list[str] = []

    def _scenario(self, scenario: Mapping[str, Any] | None) -> dict[str, Any]:
        """The scenario to run: the given one (or :data:`TINY`) with the plugin first (after the
        plugins it requires), and what its ``requires`` asks for."""
        from fedlt.hooks.discovery import discover_plugins

        base = copy.deepcopy(dict(scenario) if scenario is not None else TINY)
        requires = set(getattr(self.cls, "requires", frozenset()))
        installed = discover_plugins()
        for other in [r.partition(":")[2] for r in requires if r.startswith("plugin:")]:
            info = installed.get(other)  # what the plugins it builds on require, it requires too
            requires |= (
                set(getattr(info.cls, "requires", ())) if info is not None and not info.error else set()
            )
        before = [{"name": r.partition(":")[2]} for r in sorted(requires) if r.startswith("plugin:")]
        others = [p for p in base.get("plugins", []) if p.get("name") not in {b["name"] for b in before}]
        base["plugins"] = [*before, {"name": self.name, **self.params}, *others]
        if "stream" in requires and base.get("stream", {}).get("kind", "none") == "none":
            base["stream"] = {"kind": "si-blurry", "n_tasks": 2, "samples_per_round": 64}
        if "prompts" in requires and base.get("model", {}).get("name") != "vit":
            base["model"] = {"name": "vit", "dim": 32, "depth": 2, "heads": 2}
        base.setdefault("engine", {})["threads"] = 1
        return base

    @property
    def index(self) -> int:
        """Where the plugin sits in the scenario's plugin list."""
        return [p["name"] for p in self.base["plugins"]].index(self.name)

    def implements(self) -> set[str]:
        from fedlt.hooks.plugin import implementations

        return set(implementations(self.cls, self.name))

    @contextmanager
    def registered(self, cls: type | None = None) -> Iterator[None]:
        """``cls`` (default: the plugin's class) discoverable as the plugin's name, here and in worker
        processes (through ``$FEDLT_EXTRA_PLUGINS``), for the length of the block."""
        from fedlt.hooks.discovery import EXTRA_PLUGINS_ENV

        cls = cls or self.cls
        if self.installed and cls is self.cls:
            yield
            return
        module = sys.modules[self.cls.__module__]
        attr = f"_fedlt_checked_{self.name.replace('-', '_')}"
        setattr(module, attr, cls)
        before = os.environ.get(EXTRA_PLUGINS_ENV)
        target = cls.__qualname__ if cls is self.cls and _importable(cls) else attr
        entry = f"{self.name}={self.cls.__module__}:{target}"
        os.environ[EXTRA_PLUGINS_ENV] = ",".join(filter(None, [before, entry]))
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(EXTRA_PLUGINS_ENV, None)
            else:
                os.environ[EXTRA_PLUGINS_ENV] = before
            with contextlib.suppress(AttributeError):
                delattr(module, attr)

    def run(
        self, label: str, spec: Mapping[str, Any] | None = None, cls: type | None = None
    ) -> tuple[dict, dict]:
        """(summary, checkpoint) of a run of ``spec`` (default: the scenario), made once per label."""
        import fedlt
        from fedlt.hooks.lifetimes import PluginWarning

        if label not in self._runs:
            threads = torch.get_num_threads()
            try:
                # what the run would warn of, the "self lives where it is read" check reports
                with self.registered(cls), warnings.catch_warnings():
                    warnings.simplefilter("ignore", PluginWarning)
                    summary = fedlt.run(dict(spec or self.base), out=self.root / label)
            finally:
                torch.set_num_threads(threads)
            self._runs[label] = (summary, _ckpt(self.root / label))
        return self._runs[label]

    def serial(self) -> tuple[dict, dict]:
        """The serial run, with the plugin's class traced (what it sets on self, and reads)."""
        if "serial" not in self._runs:
            from fedlt.hooks.lifetimes import Tracer

            self.tracer = Tracer(self.cls, self.name)
            try:
                self.run("serial", cls=self.tracer.traced)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                raise PluginCheckError("fresh instances and checked results", problem) from exc
        return self._runs["serial"]


def _ckpt(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def _same(a: Any, b: Any, where: str, tol: Mapping[str, float] | None = None) -> str | None:
    """Where two plain trees differ (tensors bit for bit, or within ``tol``), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape):
            return f"{where} differs"
        if tol is None or not a.is_floating_point():
            return None if torch.equal(a, b) else f"{where} differs"
        try:
            torch.testing.assert_close(b, a, **tol)
        except AssertionError as exc:
            return f"{where} differs beyond rounding: {str(exc).splitlines()[2:4]}"
        return None
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or set(a) != set(b):
            return f"{where} has different keys"
        for k in a:
            problem = _same(a[k], b[k], f"{where}[{k!r}]", tol)
            if problem:
                return problem
        return None
    if isinstance(a, list | tuple):
        if not isinstance(b, list | tuple) or len(a) != len(b):
            return f"{where} has a different length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            problem = _same(x, y, f"{where}[{i}]", tol)
            if problem:
                return problem
        return None
    if tol is not None and isinstance(a, float) and isinstance(b, float):
        return None if abs(a - b) <= 1e-2 + 1e-2 * abs(a) else f"{where}: {a!r} != {b!r}"
    return None if a == b else f"{where}: {a!r} != {b!r}"


def _compare_runs(
    a: tuple[dict, dict], b: tuple[dict, dict], tol: Mapping[str, float] | None = None
) -> str | None:
    (sa, ca), (sb, cb) = a, b
    for key in ("global", "client_states", "plugins"):
        problem = _same(ca[key], cb[key], key, tol)
        if problem:
            return problem
    skip = {"train_loss"} if tol is not None else set()
    fa = {k: v for k, v in sa["final"].items() if k not in skip}
    fb = {k: v for k, v in sb["final"].items() if k not in skip}
    return _same(fa, fb, "final metrics", tol)


# --------------------------------------------------------------------------- the checks


def _registration(s: _Session) -> None:
    import fedlt
    from fedlt.errors import FedltError
    from fedlt.hooks.discovery import PluginInfo, instantiate_plugins
    from fedlt.hooks.plugin import implementations

    try:
        implementations(s.cls, s.name)
        resolved = fedlt.load_scenario(s.base)
        instantiate_plugins(
            resolved.plugins[s.index : s.index + 1], {s.name: PluginInfo(s.name, "check", "check", s.cls)}
        )
    except FedltError as exc:
        raise PluginCheckError("registration", str(exc)) from exc


def _fresh_instances(s: _Session) -> None:
    s.serial()


def _self_lifetimes(s: _Session) -> None:
    from fedlt.hooks.lifetimes import static_problems

    s.serial()
    problems = sorted({*s.tracer.problems(), *static_problems(s.cls, s.name)})
    if problems:
        raise PluginCheckError("self lives where it is read", "; ".join(problems))


def _state_round_trip(s: _Session) -> None:
    _, ckpt = s.serial()
    buffer = io.BytesIO()
    torch.save({"plugins": ckpt["plugins"], "clients": ckpt["client_states"]}, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    problem = _same(ckpt["client_states"], back["clients"], "client state")
    problem = problem or _same(ckpt["plugins"], back["plugins"], "state_dict()")
    import fedlt
    from fedlt.hooks.discovery import PluginInfo, instantiate_plugins

    resolved = fedlt.load_scenario(s.base)
    (fresh,) = instantiate_plugins(
        resolved.plugins[s.index : s.index + 1], {s.name: PluginInfo(s.name, "check", "check", s.cls)}
    )
    fresh.load_state_dict(ckpt["plugins"][s.name])
    problem = problem or _same(fresh.state_dict(), ckpt["plugins"][s.name], "load_state_dict(state_dict())")
    if problem:
        raise PluginCheckError("state round-trip", problem)


def _resume(s: _Session) -> None:
    import fedlt
    from fedlt.driver.runner import Run

    serial = s.serial()

    class _Stop(Exception):
        pass

    def stop(r: int, record: Any) -> None:
        if r == 1:
            raise _Stop

    threads = torch.get_num_threads()
    try:
        with s.registered():
            run = Run.create(fedlt.load_scenario(s.base), s.root / "resumed")
            run.on_round = stop
            with contextlib.suppress(_Stop):
                run.execute()
            resumed = fedlt.resume(s.root / "resumed")
    finally:
        torch.set_num_threads(threads)
    problem = _compare_runs(serial, (resumed, _ckpt(s.root / "resumed")))
    if problem:
        raise PluginCheckError("resume == uninterrupted", problem)


def _has_effect(s: _Session) -> None:
    serial = s.serial()
    hooks = s.implements()
    without = copy.deepcopy(s.base)
    without["plugins"] = [p for p in without["plugins"] if p["name"] != s.name]
    baseline = s.run("without", without)
    if hooks & _TRAINING_HOOKS:
        if _same(baseline[1]["global"], serial[1]["global"], "global") is None:
            raise PluginCheckError(
                "has an effect",
                "training with it ended with exactly the weights of training without it: its hooks change "
                "nothing here (state on self that does not live where it is read? parameters that do "
                "nothing in 3 rounds? then pass skip=('has an effect',))",
            )
    elif "eval_logits" in hooks or "client_personalize" in hooks:
        if _same(baseline[0]["final"], serial[0]["final"], "final") is None:
            raise PluginCheckError("has an effect", "evaluating with it gave exactly the metrics without it")
    elif "eval_metrics" in hooks and not any(k.startswith(f"{s.name}.") for k in serial[0]["final"]):
        raise PluginCheckError("has an effect", f"no '{s.name}.<metric>' in the final metrics")


def _class_weights(s: _Session) -> None:
    import fedlt
    from fedlt.prepare import prepare
    from fedlt.training.context import client_context
    from fedlt.training.round import ClientTask

    with s.registered():
        p = prepare(fedlt.load_scenario(s.base), "cpu")
    for client in range(p.data.n_clients):
        if not len(p.data.client_indices[client]):
            continue
        task = ClientTask(client, 1, {"round": 1}, {})
        ctx = client_context(p.scenario, p.data, task, p.device, _recipe(p.scenario))
        hooks = p.hooks.for_client(client, 1, {}, streaming=False)
        if hooks.client_start:
            hooks.client_start(model=p.model, ctx=ctx)
        idx = ctx.indices[:64]
        x, y = p.data.x_train[idx], p.data.y_train[idx]
        with torch.no_grad():
            h = p.model.features(x)
            z = p.model.head(h)
        w = hooks.client_class_weights(logits=z, y=y, features=h, head_input=h, model=p.model, ctx=ctx)
        if w is None:
            continue
        for c in y.unique():
            values = w[y == c]
            if not torch.equal(values, values[:1].expand_as(values)):
                raise PluginCheckError(
                    "class weights depend only on the class",
                    f"client {client}: samples of class {int(c)} got different weights "
                    f"{values[:4].tolist()}: per-sample weights belong in client_sample_weights",
                )


def _recipe(scenario: Any) -> Any:
    from fedlt.hooks.recipe import LocalTraining

    return LocalTraining.from_scenario(scenario)


def _vectorized(s: _Session) -> None:
    serial = s.serial()
    spec = copy.deepcopy(s.base)
    spec["engine"] = {**spec.get("engine", {}), "vectorize": "on"}
    try:
        vectorized = s.run("vectorized", spec)
    except Exception as exc:
        raise PluginCheckError(
            "serial == vectorized",
            f"the run with engine.vectorize = 'on' failed: {exc}. A plugin declaring vectorized = True "
            "promises per-batch hooks that run for a group of clients at once (docs/vectorized.md)",
        ) from exc
    problem = _compare_runs(serial, vectorized, VECTORIZED_TOL)
    if problem:
        raise PluginCheckError("serial == vectorized", problem)


def _ray(s: _Session) -> None:
    serial = s.serial()
    spec = copy.deepcopy(s.base)
    spec["engine"] = {**spec.get("engine", {}), "kind": "ray", "threads": 1}
    problem = _compare_runs(serial, s.run("ray", spec))
    if problem:
        raise PluginCheckError("serial == Ray", problem)


def plugin_checks(
    plugin: type | str,
    params: Mapping[str, Any] | None = None,
    *,
    scenario: Mapping[str, Any] | None = None,
    engines: Sequence[str] = ("serial", "vectorized", "ray"),
    skip: Sequence[str] = (),
    out: str | Path | None = None,
) -> list[Check]:
    """The checks that apply to ``plugin``, each a callable :class:`Check` (see :func:`check_plugin`
    for the parameters). Checks that do not apply are left out; ``skip`` leaves out named ones."""
    s = _Session(plugin, params, scenario, engines, out)
    hooks = s.implements()
    chosen: list[tuple[str, Callable[[_Session], None]]] = [
        ("registration", _registration),
        ("fresh instances and checked results", _fresh_instances),
        ("self lives where it is read", _self_lifetimes),
        ("state round-trip", _state_round_trip),
        ("resume == uninterrupted", _resume),
    ]
    if hooks & (_TRAINING_HOOKS | {"eval_logits", "client_personalize", "eval_metrics"}):
        chosen.append(("has an effect", _has_effect))
    if "client_class_weights" in hooks or getattr(s.cls, "class_weighting", False):
        chosen.append(("class weights depend only on the class", _class_weights))
    if getattr(s.cls, "vectorized", False):
        if "vectorized" in s.engines:
            chosen.append(("serial == vectorized", _vectorized))
        else:
            s.skipped.append("serial == vectorized: 'vectorized' not in engines")
    if "ray" in s.engines:
        if importlib.util.find_spec("ray") is None:
            s.skipped.append("serial == Ray: Ray is not installed")
        elif not (s.installed or _importable(s.cls)):
            s.skipped.append("serial == Ray: the class is not importable by workers (defined in a function?)")
        else:
            chosen.append(("serial == Ray", _ray))
    for name in skip:
        if name not in [n for n, _ in chosen]:
            raise ValueError(f"skip names an unknown or inapplicable check {name!r}")
        s.skipped.append(f"{name}: skipped by the caller")
    return [Check(name, s, fn) for name, fn in chosen if name not in skip]


def check_plugin(
    plugin: type | str,
    params: Mapping[str, Any] | None = None,
    *,
    scenario: Mapping[str, Any] | None = None,
    engines: Sequence[str] = ("serial", "vectorized", "ray"),
    skip: Sequence[str] = (),
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Run the conformance checks on one plugin; raise :class:`PluginCheckError` on the first failure.

    Parameters
    ----------
    plugin : Plugin subclass or str
        The plugin class (registered for the checks under ``plugin.name`` or its class name in
        lowercase-hyphen form) or the name of an installed plugin.
    params : mapping, optional
        The plugin's parameters for the runs.
    scenario : mapping, optional
        The scenario to run (default :data:`TINY`: long-tailed digits, 4 clients, 3 rounds); the
        plugin is put first in its ``plugins`` list (after plugins it requires), and a stream or a
        ViT is added when its ``requires`` asks for one.
    engines : sequence of str, default=("serial", "vectorized", "ray")
        ``"vectorized"`` adds the serial == vectorized check for a plugin declaring
        ``vectorized = True``; ``"ray"`` the serial == Ray check (when Ray is installed and the
        class can be imported by worker processes). The serial engine always runs.
    skip : sequence of str
        Names of checks to leave out (e.g. ``("has an effect",)`` for parameters that change
        nothing in three rounds), reported as skipped.
    out : path, optional
        Where to keep the runs (default: a temporary folder, removed at exit).

    Returns
    -------
    dict
        ``{"checks": [names passed], "skipped": [notes], "final": final metrics}``.
    """
    checks = plugin_checks(plugin, params, scenario=scenario, engines=engines, skip=skip, out=out)
    session = checks[0].session
    for check in checks:
        try:
            check()
        except PluginCheckError:
            raise
        except Exception as exc:
            raise PluginCheckError(check.name, f"{type(exc).__name__}: {exc}") from exc
    return {
        "checks": [c.name for c in checks],
        "skipped": list(session.skipped),
        "final": session.serial()[0]["final"],
    }


def parametrize_with_checks(
    plugin: type | str,
    params: Mapping[str, Any] | None = None,
    **options: Any,
) -> Any:
    """A ``pytest.mark.parametrize`` over the plugin's checks, one test each, named after the check::

        @parametrize_with_checks(FedProx, {"mu": 0.1})
        def test_fedprox(check):
            check()

    ``options`` as for :func:`check_plugin` (``scenario``, ``engines``, ``skip``, ``out``). The
    checks share their runs, so the whole set costs what :func:`check_plugin` costs.
    """
    import pytest

    checks = plugin_checks(plugin, params, **options)
    return pytest.mark.parametrize("check", checks, ids=[c.name.replace(" ", "-") for c in checks])
