"""Faithful long-tailed remedies (issue 19): the personalised mask as an evaluation setting, LDAM's
evaluation scale, class-balanced normalisations, and pinned defaults."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import fedlt
from fedlt.errors import PluginError, ScenarioError
from fedlt.evaluation.evaluator import Evaluator
from fedlt.hooks.dispatch import build_hooks

# --------------------------------------------------------------------------- personalised mask


class _Identity(nn.Module):
    """features(x) = x, head = the identity map on 3 classes: logits are the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


#: Client 0's local test view: 4 samples of classes 0 and 1 (class 2 absent from the view).
X_TEST = torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
Y_TEST = torch.tensor([0, 0, 1, 1])
#: Client 0 trained on classes 0 and 2 only (class 1 absent from its training data).
TRAIN_COUNTS = np.array([5, 0, 5])


def _evaluator(tiny, mask: str) -> Evaluator:
    tiny["eval"] = {"personalized_mask": mask, "shot_rule": "count"}
    scenario = fedlt.load_scenario(tiny)
    data = SimpleNamespace(
        num_classes=3,
        x_test=X_TEST,
        y_test=Y_TEST,
        test_views=[np.arange(4), np.array([], dtype=np.int64)],
        train_class_counts=np.array([10, 10, 10]),
        x_ood=None,  # no [eval.ood]
        y_train_clean=None,  # no [noise]
    )
    views = SimpleNamespace(seen_counts=lambda k: TRAIN_COUNTS)
    return Evaluator(scenario, data, build_hooks(scenario.plugins), views)


@pytest.mark.parametrize(
    ("mask", "accuracy"),
    [
        # Unmasked argmax: [2, 0, 2, 0] against [0, 0, 1, 1]: 1 of 4 right.
        ("none", 0.25),
        # Class 2 hidden (absent from the view): [0, 0, 1, 0]: 3 of 4.
        ("test-classes", 0.75),
        # Class 1 hidden (no training sample): [2, 0, 2, 0]; class-1 samples can never be right: 1 of 4.
        ("train-classes", 0.25),
        # No plugin asks for a mask: none.
        ("auto", 0.25),
    ],
)
def test_personalized_mask_by_hand(tiny, mask, accuracy):
    ev = _evaluator(tiny, mask)
    out = ev.evaluate(_Identity(), round=1, client_states={})
    assert out["personalized_accuracy"] == pytest.approx(accuracy)
    expected = "none" if mask == "auto" else mask
    assert out["personalized_mask"] == expected
    assert out["personalized_mask_source"] == ("default" if mask == "auto" else "eval.personalized_mask")
    # The global (balanced-test) accuracy is never masked: argmax [2, 0, 2, 0] -> 1 of 4.
    assert out["accuracy"] == pytest.approx(0.25)


def test_train_classes_mask_differs_from_test_classes_on_the_hidden_logits(tiny):
    """The masked logits are -1e9 exactly where the hand-written class sets say."""
    from fedlt.evaluation.evaluator import PERSONAL_MASKED, personal_mask

    ev = _evaluator(tiny, "none")
    ctx = ev._ctx(1, 0, Y_TEST)
    z = X_TEST.clone()
    test = personal_mask(z, "test-classes", ctx)
    train = personal_mask(z, "train-classes", ctx)
    assert bool((test[:, 2] == PERSONAL_MASKED).all()) and torch.equal(test[:, :2], z[:, :2])
    assert bool((train[:, 1] == PERSONAL_MASKED).all()) and torch.equal(train[:, [0, 2]], z[:, [0, 2]])
    assert torch.equal(personal_mask(z, "none", ctx), z)


def test_unknown_personalized_mask_is_refused(tiny):
    tiny["eval"] = {"personalized_mask": "seen"}
    with pytest.raises(ScenarioError, match="personalized_mask"):
        fedlt.load_scenario(tiny)


def test_a_plugin_asking_for_an_unknown_mask_is_named_before_any_round(install_plugins, tiny, tmp_path):
    class Bad(fedlt.Plugin):
        @fedlt.hookimpl
        def eval_personalized_mask(self) -> str:
            return "seen-classes"

    install_plugins(bad=Bad)
    tiny["plugins"] = [{"name": "bad"}]
    with pytest.raises(PluginError, match="seen-classes") as info:
        fedlt.run(tiny, out=tmp_path / "r")
    assert info.value.plugin == "bad" and info.value.hook == "eval_personalized_mask"
    metrics = tmp_path / "r" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text()


def test_the_scenario_mask_overrides_the_plugins(tiny, tmp_path):
    """FedLoGe's gla-fr asks for the test-classes mask; eval.personalized_mask = "none" wins, and
    FedAvg can be given the same mask: the record states which."""
    tiny["federation"].update(rounds=1, eval_every=1)
    tiny["plugins"] = [{"name": "gla-fr", "mask": "test"}]
    auto = fedlt.run(tiny, out=tmp_path / "auto")["final"]
    assert (auto["personalized_mask"], auto["personalized_mask_source"]) == ("test-classes", "gla-fr")
    tiny["eval"] = {"personalized_mask": "none"}
    none = fedlt.run(tiny, out=tmp_path / "none")["final"]
    assert (none["personalized_mask"], none["personalized_mask_source"]) == ("none", "eval.personalized_mask")
    tiny["plugins"] = []
    tiny["eval"] = {"personalized_mask": "test-classes"}
    fedavg = fedlt.run(tiny, out=tmp_path / "fedavg")["final"]
    assert fedavg["personalized_mask"] == "test-classes"


# --------------------------------------------------------------------------- LDAM's scale at evaluation


class _Features2(nn.Module):
    """features(x) = x on 2-d inputs; the head is whatever LDAM installs."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _two_class_evaluator(
    tiny, plugins, train_counts, head: list[list[float]], x_test: list[list[float]], y_test: list[int]
) -> tuple[Evaluator, nn.Module]:
    """An evaluator over a hand-made 2-class test set and a model with identity features and the
    given head rows (bias 0), after the plugins' ``configure_model``."""
    from support.contexts import setup_ctx

    tiny["plugins"] = plugins
    tiny["eval"] = {"personalized": False}
    scenario = fedlt.load_scenario(tiny)
    hooks = build_hooks(scenario.plugins)
    model = _Features2()
    hooks.configure_model(model=model, ctx=setup_ctx(2, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(head))
        if model.head.bias is not None:
            model.head.bias.zero_()
    data = SimpleNamespace(
        num_classes=2,
        x_test=torch.tensor(x_test),
        y_test=torch.tensor(y_test),
        test_views=[],
        train_class_counts=np.asarray(train_counts),
        x_ood=None,  # no [eval.ood]
        y_train_clean=None,  # no [noise]
    )
    return Evaluator(scenario, data, hooks, SimpleNamespace()), model


def _ldam_evaluator(tiny, plugins, train_counts) -> tuple[Evaluator, nn.Module]:
    """Identity head (cosine, no bias under LDAM), samples [1, 0] and [0.6, 0.8]."""
    return _two_class_evaluator(
        tiny, plugins, train_counts, [[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.6, 0.8]], [0, 1]
    )


def test_ldam_calibration_reads_the_scaled_cosines(tiny):
    # Cosines: sample 0 [1, 0], sample 1 [0.6, 0.8]; logits at s = 30: [30, 0] and [18, 24].
    # Both right; confidences sigmoid(30) and sigmoid(6), both in the top bin of 15, so
    # ECE = 1 - mean(confidence). Unscaled cosines would give sigmoid(1) and sigmoid(0.2).
    ev, model = _ldam_evaluator(tiny, [{"name": "ldam"}, {"name": "calibration"}], [10, 10])
    out = ev.evaluate(model, round=1, client_states={})
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    assert out["accuracy"] == 1.0
    assert out["calibration.ece"] == pytest.approx(1 - (sig(30.0) + sig(6.0)) / 2, abs=1e-9)
    assert out["calibration.ece"] < 0.01  # unscaled: 1 - (0.731 + 0.550) / 2 = 0.36


def test_ldam_posthoc_adjust_subtracts_log_prior_from_the_scaled_cosines(tiny):
    # Prior [1000, 1] / 1001: -log pi = [0.0010, 6.9088]. Scaled: [30.001, 6.909] -> 0 (right) and
    # [18.001, 30.909] -> 1 (right). On unscaled cosines the prior would win sample 0:
    # [1.001, 6.909] -> 1 (wrong).
    plugins = [{"name": "ldam"}, {"name": "posthoc-adjust", "prior": "global"}]
    ev, model = _ldam_evaluator(tiny, plugins, [1000, 1])
    out = ev.evaluate(model, round=1, client_states={})
    assert out["accuracy"] == 1.0
    log_pi = np.log(np.array([1000, 1]) / 1001)
    z = 30 * np.array([[1.0, 0.0], [0.6, 0.8]]) - log_pi
    assert list(z.argmax(1)) == [0, 1]
    unscaled = np.array([[1.0, 0.0], [0.6, 0.8]]) - log_pi
    assert list(unscaled.argmax(1)) == [1, 1]  # what the unscaled cosines would have predicted


def test_ldam_linear_head_with_a_scale_evaluates_s_times_the_logits():
    from support.contexts import plugin

    z = torch.tensor([[1.0, -2.0]])
    ldam = plugin("ldam", head="linear", scale=4.0)
    torch.testing.assert_close(ldam.eval_logits(logits=z), 4.0 * z)
    assert torch.equal(plugin("ldam", head="linear").eval_logits(logits=z), z)


# --------------------------------------------------------------------------- pinned defaults

#: Official CReFF code (Shang et al., IJCAI 2022; ``--num_of_feature``): 100 federated features per class.
CREFF_OFFICIAL_N_FEATURES = 100


def test_posthoc_adjust_defaults_to_the_global_evaluation_only():
    """Menon et al.'s correction targets a balanced test distribution: by default only the global
    (balanced) evaluation is adjusted, and each client's imbalanced local view is left alone."""
    from support.contexts import eval_ctx, plugin

    posthoc = plugin("posthoc-adjust")
    assert posthoc.params.apply_to == "global" and posthoc.params.prior == "global"
    assert posthoc.params.tau == 1.0
    z = torch.zeros(1, 2)
    # Counts [3, 1]: the global logits become -log pi = [-log 0.75, -log 0.25]; a client's stay.
    glob = posthoc.eval_logits(logits=z, model=None, ctx=eval_ctx(None, global_counts=[3, 1]))
    torch.testing.assert_close(glob, -torch.log(torch.tensor([[0.75, 0.25]])))
    client = eval_ctx(0, local_counts=[3, 1], global_counts=[3, 1])
    assert torch.equal(posthoc.eval_logits(logits=z, model=None, ctx=client), z)


def test_creff_defaults_to_the_official_number_of_features():
    from support.contexts import plugin, setup_ctx

    creff = plugin("creff")
    assert creff.params.n_features == CREFF_OFFICIAL_N_FEATURES

    class Identity(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feature_dim = 4
            self.head = nn.Linear(4, 3)

    creff.server_setup(model=Identity(), ctx=setup_ctx(3, input_shape=(4,)))
    assert tuple(creff._features.shape) == (3, CREFF_OFFICIAL_N_FEATURES, 4)


def test_the_results_page_states_the_pinned_defaults():
    """docs/results.md tells readers these defaults in prose: it must keep agreeing with the code."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert '**posthoc-adjust** defaults to `apply_to = "global"`' in text
    assert f"**CReFF**'s `n_features` defaults to {CREFF_OFFICIAL_N_FEATURES} federated features" in text


# --------------------------------------------------------------------------- one head per diagnostic report


def _nc_evaluator(tiny, plugins, train_counts=(10, 10)) -> tuple[Evaluator, nn.Module]:
    """2 classes, identity features; model.head rows [1, 1] and [3, -1] (unequal norms), bias 0.
    Class 0 around [1, 0], class 1 around [0, 1]: centred class means [0.5, -0.5], [-0.5, 0.5]."""
    x_test = [[1.0, 0.2], [1.0, -0.2], [0.2, 1.0], [-0.2, 1.0]]
    return _two_class_evaluator(tiny, plugins, train_counts, [[1.0, 1.0], [3.0, -1.0]], x_test, [0, 0, 1, 1])


def test_neural_collapse_describes_the_realigned_head_gla_fr_scores_with(tiny):
    # gla-fr's global evaluation scores with the realigned aux head: rows gamma * w / |w|. With aux
    # rows [2, 0] and [0, 1] (bias 0) and gamma 1.7: W = [[1.7, 0], [0, 1.7]].
    #   NC2 equinorm of W: norms equal -> 0 (model.head's [sqrt2, sqrt10] would give 0.38).
    #   NC3 = ||W/||W||_F - M/||M||_F||^2 with M = [[.5, -.5], [-.5, .5]]:
    #       2 (1/sqrt2 - 1/2)^2 + 2 (1/2)^2 = 2 - sqrt2.
    #   NC4: W's argmax on the 4 samples is [0, 0, 1, 1], the nearest centres too: 0
    #       (model.head's argmax is [1, 1, 0, 0]: all 4 disagree).
    plugins = [{"name": "gla-fr", "global_head": "realigned"}, {"name": "neural-collapse"}]
    ev, model = _nc_evaluator(tiny, plugins)
    with torch.no_grad():
        model.gla_aux.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        model.gla_aux.bias.zero_()
    out = ev.evaluate(model, round=1, client_states={})
    assert out["evaluated_head"] == "model.head -> gla-fr"
    assert out["neural-collapse.nc2_equinorm_head"] == pytest.approx(0.0, abs=1e-7)
    assert out["neural-collapse.nc3"] == pytest.approx(2 - np.sqrt(2), abs=1e-6)
    assert out["neural-collapse.nc4"] == 0.0
    assert out["accuracy"] == 1.0
    norms = np.array([np.sqrt(2), np.sqrt(10)])
    assert norms.std() / norms.mean() == pytest.approx(0.38, abs=0.01)  # what model.head would say


def test_posthoc_adjust_keeps_the_head_weight_and_shifts_its_bias(tiny):
    # posthoc-adjust (global prior [3, 1], tau 1): the evaluated head is model.head's weight with
    # bias 0 - log pi = [-log 0.75, -log 0.25] = [0.287682, 1.386294].
    plugins = [{"name": "posthoc-adjust"}, {"name": "neural-collapse"}]
    ev, model = _nc_evaluator(tiny, plugins, train_counts=(3, 1))
    ctx = ev._ctx(1, None, torch.tensor([0, 0, 1, 1]))
    weight, bias = ev._evaluated_head(model, torch.zeros(4, 2), ctx, {})
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0], [3.0, -1.0]]))
    torch.testing.assert_close(bias, torch.tensor([0.287682, 1.386294]))
    out = ev.evaluate(model, round=1, client_states={})
    assert out["evaluated_head"] == "model.head -> posthoc-adjust"
    # NC4 on the adjusted logits: x W^T + b = [[1.49, 4.19], [1.09, 4.59], [1.49, 0.79], [1.09, -0.21]]
    # -> [1, 1, 0, 0] against the centres' [0, 0, 1, 1]: all disagree.
    assert out["neural-collapse.nc4"] == 1.0


def test_ldam_cosine_head_is_described_by_its_scaled_unit_rows(tiny):
    # The evaluated head of LDAM's cosine head at s = 30: rows 30 * w / |w| (bias 0), as its
    # logits s cos(h, w) are for unit features.
    ev, model = _nc_evaluator(tiny, [{"name": "ldam"}, {"name": "neural-collapse"}])
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    ctx = ev._ctx(1, None, torch.tensor([0, 0, 1, 1]))
    weight, bias = ev._evaluated_head(model, torch.zeros(4, 2), ctx, {})
    torch.testing.assert_close(weight, torch.tensor([[18.0, 24.0], [0.0, 30.0]]))
    torch.testing.assert_close(bias, torch.zeros(2))
