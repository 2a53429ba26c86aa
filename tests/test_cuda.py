"""The CUDA path: data and model resident on the GPU, plugins working there, same results as CPU.

Skipped where no GPU is visible (CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``.
GPU and CPU kernels sum in different orders, so CUDA results are compared with CPU ones within a
tolerance; on the same device everything (resume included) is compared exactly.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path

import pytest
import torch

import fedlt
from fedlt.driver.runner import Run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def _on(scenario: dict, device: str) -> dict:
    s = copy.deepcopy(scenario)
    s.setdefault("engine", {})["device"] = device
    return s


def _finite(summary: dict) -> bool:
    final = summary["final"]
    return all(math.isfinite(v) for v in final.values() if isinstance(v, float))


def test_data_and_model_live_on_the_gpu(tiny, tmp_path):
    run = Run.create(fedlt.load_scenario(_on(tiny, "cuda")), tmp_path / "r")
    summary = run.execute()
    assert run.data.x_train.is_cuda and run.data.y_train.is_cuda and run.data.x_test.is_cuda
    assert all(p.is_cuda for p in run.model.parameters())
    assert all(p.is_cuda for p in run.engine.trainer.model.parameters())
    assert _finite(summary) and summary["final"]["accuracy"] > 0.3


@pytest.mark.parametrize(
    "plugins",
    [
        [],
        [{"name": "balanced-softmax", "prior": "local"}],
        [{"name": "focal", "gamma": 2.0}, {"name": "class-aware"}],
        [{"name": "ldam", "scale": 1.0, "prior": "estimated", "drw": True, "drw_start_round": 2}],
        [{"name": "sse-c"}],
        [{"name": "gla-fr"}],
        [{"name": "fedbabu"}],
        [{"name": "creff", "n_features": 8, "n_match_steps": 10, "n_retrain_epochs": 20}],
        [{"name": "posthoc-adjust", "prior": "local", "apply_to": "personalized"}],
    ],
    ids=lambda p: "+".join(x["name"] for x in p) or "fedavg",
)
def test_plugins_on_gpu_match_cpu(tiny, tmp_path, plugins):
    tiny["plugins"] = plugins
    cpu = fedlt.run(_on(tiny, "cpu"), out=tmp_path / "cpu")
    gpu = fedlt.run(_on(tiny, "cuda"), out=tmp_path / "gpu")
    assert _finite(gpu)
    for key in ("accuracy", "balanced_accuracy", "personalized_accuracy"):
        assert gpu["final"][key] == pytest.approx(cpu["final"][key], abs=0.05), key


def test_continual_stream_with_replay_on_gpu_matches_cpu(tmp_path):
    s = tomllib.loads((SCENARIOS / "siblurry_quick.toml").read_text())
    s["plugins"] = [{"name": "replay", "reweight": "inverse-frequency"}, {"name": "seen-class-mask"}]
    cpu = fedlt.run(_on(s, "cpu"), out=tmp_path / "cpu")
    gpu = fedlt.run(_on(s, "cuda"), out=tmp_path / "gpu")
    assert _finite(gpu)
    assert gpu["final"]["a_auc"] == pytest.approx(cpu["final"]["a_auc"], abs=0.05)


def test_cnn_with_augmentation_on_gpu(tmp_path):
    s = {
        "name": "gpu-cnn",
        "data": {
            "dataset": "synthetic",
            "n_train": 600,
            "n_test": 200,
            "shape": [3, 32, 32],
            "augment": "crop-flip",
        },
        "partition": {"kind": "dirichlet", "n_clients": 6, "alpha": 0.5},
        "model": {"name": "resnet8", "width": 8},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "federation": {"rounds": 3, "fraction_clients": 0.5, "eval_every": 1},
        "plugins": [{"name": "balanced-softmax"}],
    }
    summary = fedlt.run(_on(s, "cuda"), out=tmp_path / "r")
    assert _finite(summary) and summary["final"]["accuracy"] > 0.2


def test_resume_on_gpu_matches_uninterrupted(tiny, tmp_path, interrupted_run):
    tiny["federation"].update(rounds=4)
    tiny["plugins"] = [{"name": "balanced-softmax", "prior": "local"}]
    s = _on(tiny, "cuda")
    full = fedlt.run(s, out=tmp_path / "full")
    interrupted_run(s, tmp_path / "cut", after=2)
    assert fedlt.resume(tmp_path / "cut")["final"] == full["final"]
