"""posthoc-adjust shifts evaluation logits by -tau log pi, for the evaluations and prior it is told."""

from __future__ import annotations

import math

import pytest
import torch
from support.contexts import eval_ctx, hook_set

import fedlt
from fedlt.hooks.context import EvalContext
from fedlt.hooks.dispatch import HookSet

LOG_PI = torch.tensor([math.log(0.75), math.log(0.25)])  # counts [3, 1]: [-0.287682, -1.386294]


def _ectx(client_id=None, local=None, global_=(3, 1)) -> EvalContext:
    return eval_ctx(client_id, local_counts=local, global_counts=global_)


class _Adjust:
    """posthoc-adjust's eval_logits through the dispatcher, as an evaluation calls it."""

    def __init__(self, hooks: HookSet) -> None:
        self.hooks = hooks

    def eval_logits(self, logits, model, ctx):
        return self.hooks.eval_logits(logits=logits, features=None, model=model, ctx=ctx, state={})


def _plugin(**params):
    """posthoc-adjust with ``params``; prior and apply_to are always explicit (not the defaults,
    which the tests do not pin): prior "global", applied to both evaluations unless given."""
    return _Adjust(hook_set({"name": "posthoc-adjust", "prior": "global", "apply_to": "both", **params}))


Z = torch.tensor([[2.0, 1.5], [3.0, 1.0], [2.0, 1.0]])


def test_posthoc_adjust_matches_formula_and_flips_predictions():
    # z - log pi with pi = [3/4, 1/4]:
    #   [2, 1.5] -> [2.287682, 2.886294]: prediction 0 -> 1
    #   [3, 1]   -> [3.287682, 2.386294]: stays 0
    #   [2, 1]   -> [2.287682, 2.386294]: prediction 0 -> 1
    out = _plugin().eval_logits(logits=Z, model=None, ctx=_ectx())
    torch.testing.assert_close(out, Z - LOG_PI)
    torch.testing.assert_close(out[0], torch.tensor([2.287682, 2.886294]))
    assert Z.argmax(1).tolist() == [0, 0, 0]
    assert out.argmax(1).tolist() == [1, 0, 1]


def test_posthoc_tau_scales_the_shift():
    # tau 0.5: [2, 1] -> [2 + 0.143841, 1 + 0.693147] = [2.143841, 1.693147]: stays 0.
    out = _plugin(tau=0.5).eval_logits(logits=Z, model=None, ctx=_ectx())
    torch.testing.assert_close(out, Z - 0.5 * LOG_PI)
    assert out.argmax(1).tolist() == [1, 0, 0]
    torch.testing.assert_close(_plugin(tau=0.0).eval_logits(logits=Z, model=None, ctx=_ectx()), Z)


def test_posthoc_tau_one_is_thresholding_by_priors():
    # argmax_c p(c|x) / pi_c (Buda et al.) on random logits equals argmax of the adjusted logits.
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(0)) * 2
    out = _plugin(tau=1.0).eval_logits(logits=z, model=None, ctx=_ectx())
    thresholded = (z.softmax(1) / torch.tensor([0.75, 0.25])).argmax(1)
    assert torch.equal(out.argmax(1), thresholded)
    assert not torch.equal(z.argmax(1), thresholded)  # the example is not trivial


def test_posthoc_local_prior_uses_the_evaluated_clients_counts():
    # Client with local counts [1, 3] (global [3, 1] ignored): shift by -log [1/4, 3/4].
    plugin = _plugin(prior="local", apply_to="personalized")
    out = plugin.eval_logits(logits=Z, model=None, ctx=_ectx(client_id=2, local=[1, 3]))
    torch.testing.assert_close(out, Z - LOG_PI.flip(0))
    # The global evaluation is left alone.
    assert torch.equal(plugin.eval_logits(logits=Z, model=None, ctx=_ectx()), Z)


@pytest.mark.parametrize(
    ("apply_to", "global_changed", "client_changed"),
    [("global", True, False), ("personalized", False, True), ("both", True, True)],
)
def test_posthoc_apply_to_selects_evaluations(apply_to, global_changed, client_changed):
    plugin = _plugin(prior="global", apply_to=apply_to)
    g = plugin.eval_logits(logits=Z, model=None, ctx=_ectx())
    c = plugin.eval_logits(logits=Z, model=None, ctx=_ectx(client_id=0, local=[1, 1]))
    assert (not torch.equal(g, Z)) is global_changed
    assert (not torch.equal(c, Z)) is client_changed
    if client_changed:  # prior 'global' on a client's view: still the global counts
        torch.testing.assert_close(c, Z - LOG_PI)


@pytest.mark.parametrize("apply_to", ["global", "both"])
def test_posthoc_local_prior_rejected_for_global_evaluation(apply_to):
    with pytest.raises(fedlt.ScenarioError, match="'personalized' when prior is 'local'"):
        _plugin(prior="local", apply_to=apply_to)


def test_posthoc_estimated_prior_reads_the_evaluated_models_head():
    # Head row norms [2, 1] -> shares ∝ norm^3 = [8, 1] / 9, scaled to the global total 400
    # (large enough that no estimated count falls below the floor of 1).
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    out = _plugin(prior="estimated").eval_logits(logits=Z, model=model, ctx=_ectx(global_=(300, 100)))
    torch.testing.assert_close(out, Z - torch.tensor([math.log(8 / 9), math.log(1 / 9)]))


def test_posthoc_personalized_only_leaves_training_and_global_metrics_alone(tiny, tmp_path):
    base = fedlt.run(tiny, out=tmp_path / "base", **{"federation.rounds": 2})["final"]
    tiny["plugins"] = [{"name": "posthoc-adjust", "prior": "local", "apply_to": "personalized"}]
    adj = fedlt.run(tiny, out=tmp_path / "adj", **{"federation.rounds": 2})["final"]
    assert adj["accuracy"] == base["accuracy"]
    assert adj["balanced_accuracy"] == base["balanced_accuracy"]
    assert adj["personalized_accuracy"] != base["personalized_accuracy"]
