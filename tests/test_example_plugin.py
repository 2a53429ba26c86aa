"""The worked example of docs/plugins.md works: a third-party distribution found by entry point.

The distribution under docs/example-plugin is not pip-installed here: its folder goes on
``sys.path`` and its entry point is faked by monkeypatching ``importlib.metadata.entry_points``
(what fedlt.pluginmanager calls), so the test exercises the same discovery path as an install.
"""

from __future__ import annotations

import importlib.metadata as md
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fedlt
from fedlt.config import load_scenario
from fedlt.errors import ScenarioError
from fedlt.pluginmanager import ENTRY_POINT_GROUP, build_hooks, discover_plugins

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example-plugin"

SCENARIO: dict[str, Any] = {
    "name": "label-smoothing-test",
    "seed": 1,
    "data": {"dataset": "digits"},
    "long_tail": {"profile": "exponential", "imbalance_factor": 10},
    "partition": {"kind": "dirichlet", "n_clients": 3, "alpha": 0.5},
    "model": {"name": "mlp", "hidden": [32]},
    "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.1},
    "federation": {"rounds": 5, "eval_every": 1},
    "eval": {"shot_thresholds": [60, 20]},
    "plugins": [{"name": "label-smoothing", "epsilon": 0.2}],
}


@pytest.fixture
def label_smoothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make docs/example-plugin importable and register its entry point, as `pip install` would."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "fedlt_label_smoothing", raising=False)
    fake = md.EntryPoint(
        name="label-smoothing", value="fedlt_label_smoothing:LabelSmoothing", group=ENTRY_POINT_GROUP
    )
    real_entry_points = md.entry_points

    def entry_points(**params: Any) -> Any:
        found = real_entry_points(**params)
        if params.get("group") == ENTRY_POINT_GROUP:
            return [*found, fake]
        return found

    monkeypatch.setattr(md, "entry_points", entry_points)


def test_discovered_next_to_builtins(label_smoothing: None) -> None:
    plugins = discover_plugins()
    info = plugins["label-smoothing"]
    assert info.value == "fedlt_label_smoothing:LabelSmoothing"
    assert info.distribution == "?"  # a hand-made EntryPoint has no distribution
    assert info.hooks == ["client_loss"]
    assert [p["name"] for p in info.parameters()] == ["epsilon"]
    assert {"focal", "balanced-softmax"} <= set(plugins)


def test_loss_is_label_smoothed_cross_entropy(label_smoothing: None) -> None:
    # Prepare: sample 0 has equal logits (p = 1/3 each); sample 1 has p = (1/2, 1/4, 1/4), y = 0.
    hooks = build_hooks(load_scenario({"plugins": [{"name": "label-smoothing", "epsilon": 0.3}]}).plugins)
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])

    # Execute: through fedlt's dispatch, as the training loop calls it.
    loss = hooks.client_loss.first(logits=logits, y=y, features=None, ctx=None, states={})

    # Assert: sample 0: 0.7 ln 3 + 0.3 ln 3 = ln 3;
    # sample 1: 0.7 ln 2 + 0.3 (ln 2 + ln 4 + ln 4) / 3 = 0.7 ln 2 + 0.5 ln 2 = 1.2 ln 2.
    expected = torch.tensor([math.log(3.0), 1.2 * math.log(2.0)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="none", label_smoothing=0.3))


def test_two_round_run(label_smoothing: None, tmp_path: Path) -> None:
    summary = fedlt.run(SCENARIO, out=tmp_path / "run", federation__rounds=2)
    assert summary["plugins"] == ["label-smoothing"]
    assert summary["rounds"] == 2
    assert math.isfinite(summary["final"]["train_loss"])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert 'name = "label-smoothing"' in (tmp_path / "run" / "scenario.toml").read_text()


def test_example_scenario_loads(label_smoothing: None) -> None:
    hooks = build_hooks(load_scenario(EXAMPLE / "scenario.toml").plugins)
    assert hooks.names == ["label-smoothing"]
    assert hooks.by_name["label-smoothing"].params.epsilon == 0.1


@pytest.mark.parametrize("epsilon", [1.0, -0.1, "big"])
def test_bad_epsilon_names_the_key(label_smoothing: None, tmp_path: Path, epsilon: Any) -> None:
    scenario = {**SCENARIO, "plugins": [{"name": "label-smoothing", "epsilon": epsilon}]}
    with pytest.raises(ScenarioError, match=r"'plugins\[0\]\.epsilon'.*plugin 'label-smoothing'") as excinfo:
        fedlt.run(scenario, out=tmp_path / "run")
    assert excinfo.value.key == "plugins[0].epsilon"
    assert not (tmp_path / "run").exists()  # stopped before any work
