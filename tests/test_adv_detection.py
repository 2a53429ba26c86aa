"""eval.attack.detect: the run's OOD score separating clean test samples from their attacked
copies (adversarial-sample detection, as the Mahalanobis detector's paper evaluates it), checked
against scikit-learn on the scores the score hook returned and against the selection rule written
out here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import fedlt
from fedlt.errors import ScenarioError
from fedlt.prepare import build_data

EPS = 0.5


class _Energy(fedlt.Plugin):
    """logsumexp of the evaluated logits, remembering every (inputs, logits, score) it saw."""

    seen: ClassVar[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

    @fedlt.hookimpl
    def eval_ood_score(self, logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        score = torch.logsumexp(logits, dim=1)
        _Energy.seen.append((inputs.detach().clone(), logits.detach().clone(), score.detach().clone()))
        return score


def _scenario(tiny: dict[str, Any], detect: str) -> dict[str, Any]:
    s = copy.deepcopy(tiny)
    s["eval"]["attack"] = {"kind": "pgd", "eps": EPS, "steps": 3, "detect": detect}
    s["plugins"] = [{"name": "energy"}]
    return s


@pytest.mark.parametrize("detect", ["successful", "all"])
def test_detection_metrics_are_the_scores_auroc_over_the_kept_pairs(
    install_plugins, tiny, tmp_path: Path, detect: str
) -> None:
    install_plugins(energy=_Energy)
    _Energy.seen.clear()
    s = _scenario(tiny, detect)
    final = fedlt.run(s, out=tmp_path / "r")["final"]

    (x_clean, z_clean, s_clean), (x_adv, z_adv, s_adv) = _Energy.seen[-2:]  # the last evaluation
    y = build_data(fedlt.load_scenario(s)).y_test
    assert torch.equal(x_clean, build_data(fedlt.load_scenario(s)).x_test)
    assert 0 < float((x_adv - x_clean).abs().amax()) <= EPS + 1e-6  # the attacked copy, in budget
    keep = torch.ones_like(y, dtype=torch.bool)
    if detect == "successful":  # correct on the clean sample, wrong on its copy
        keep = (z_clean.argmax(1) == y) & (z_adv.argmax(1) != y)
    pos, neg = s_clean[keep].numpy(), s_adv[keep].numpy()
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    assert final["adv_detection_n"] == int(keep.sum()) > 0
    assert final["adv_detection_score"] == "energy"
    assert final["adv_detection_auroc"] == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]), abs=1e-9)
    assert final["adv_detection_auprc"] == pytest.approx(
        average_precision_score(labels, np.r_[pos, neg]), abs=1e-9
    )
    threshold = np.quantile(pos, 0.05, method="inverted_cdf")  # 95% of clean samples at or above it
    assert final["adv_detection_fpr_at_95_tpr"] == pytest.approx(float((neg >= threshold).mean()), abs=1e-9)
    if detect == "all":
        assert final["adv_detection_n"] == y.numel()


def test_detection_leaves_the_robust_metrics_alone_and_defaults_to_msp(tiny, tmp_path: Path) -> None:
    s = copy.deepcopy(tiny)
    s["eval"]["attack"] = {"kind": "pgd", "eps": EPS, "steps": 3}
    plain = fedlt.run(copy.deepcopy(s), out=tmp_path / "plain")["final"]
    s["eval"]["attack"]["detect"] = "all"
    found = fedlt.run(s, out=tmp_path / "detect")["final"]
    assert {k: v for k, v in found.items() if not k.startswith("adv_detection")} == plain
    assert found["adv_detection_score"] == "msp" and 0 <= found["adv_detection_auroc"] <= 1
    assert not any(k.startswith("adv_detection") for k in plain)


@pytest.mark.parametrize(
    ("attack", "allowed"),
    [
        ({"detect": "all"}, "unset with kind 'none'"),
        ({"kind": "pgd", "eps": 0.1, "detect": "maybe"}, "'none', 'successful' or 'all'"),
    ],
)
def test_bad_detect_values_name_the_key(tiny, attack: dict, allowed: str) -> None:
    tiny["eval"]["attack"] = attack
    with pytest.raises(ScenarioError) as info:
        fedlt.load_scenario(tiny)
    assert "eval.attack.detect" in str(info.value) and allowed in str(info.value)
