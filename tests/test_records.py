"""Records that cannot lie: what a run folder says about how its numbers were made.

- ``fedlt resume --set federation.rounds=N`` with N below the rounds already run exits 2 naming the
  key, and leaves the folder as it was (its summary still says how many rounds ran).
- Every resume is kept: summary.json's ``resumes`` lists the round each continued from and the
  settings it changed; ``provenance`` keeps the first start's time and command; scenario.toml says
  in a comment from which round each changed value applies.
- rounds.jsonl holds every round's training loss, evaluated or not, and a resumed run writes the
  same lines as an uninterrupted one.
- The W&B run id is drawn once per folder and kept there: two folders never share one.
"""

from __future__ import annotations

import copy
import json
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
from support.scenarios import TINY

import fedlt
from fedlt.cli import main
from fedlt.driver.loggers import WandbLog, wandb_run_id


def _scenario(rounds: int = 3, eval_every: int = 1, **train: Any) -> dict[str, Any]:
    s = copy.deepcopy(TINY)
    s["federation"].update(rounds=rounds, eval_every=eval_every)
    s["train"] = {**s.get("train", {}), **train}
    s["engine"] = {"threads": 1}
    return s


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_resume_refuses_fewer_rounds_than_already_run(tmp_path: Path, capsys, restore_threads) -> None:
    run = tmp_path / "run"
    fedlt.run(_scenario(rounds=3), out=run)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "fedlt.lock"}

    assert main(["resume", str(run), "--set", "federation.rounds=2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'federation.rounds'" in err and "at least 3" in err and "Got 2" in err
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "fedlt.lock"}
    assert after == files  # nothing rewritten: the summary still says 3 rounds of 3
    assert _summary(run)["rounds"] == _summary(run)["rounds_run"] == 3

    # The same from the Python API; the same number of rounds is allowed (nothing to do).
    with pytest.raises(fedlt.ScenarioError, match=r"federation\.rounds"):
        fedlt.resume(run, federation__rounds=1)
    assert fedlt.resume(run, federation__rounds=3)["rounds_run"] == 3


def test_every_resume_is_recorded_with_what_it_changed(
    tmp_path: Path, interrupted_run, restore_threads
) -> None:
    run = tmp_path / "run"
    interrupted_run(_scenario(rounds=3, lr=0.1), run, 1)
    first = json.loads((run / "starts.json").read_text())
    assert first["resumes"] == [] and first["started"] and first["command"]

    assert main(["resume", str(run), "--set", "train.lr=0.05", "--quiet"]) == 0
    assert main(["resume", str(run), "--set", "federation.rounds=4", "--quiet"]) == 0

    summary = _summary(run)
    assert summary["provenance"]["started"] == first["started"]  # the first start, not the last
    assert summary["provenance"]["command"] == first["command"]
    resumes = summary["resumes"]
    assert [(r["round"], r["overrides"]) for r in resumes] == [
        (1, {"train.lr": 0.05}),
        (3, {"federation.rounds": 4}),
    ]
    assert all("resume" in r["command"] and r["time"] for r in resumes)

    text = (run / "scenario.toml").read_text()
    notes = [line for line in text.splitlines() if line.startswith("#")]
    assert len(notes) == 2
    assert "after round 1" in notes[0] and "from round 2, train.lr = 0.05 (was 0.1)" in notes[0]
    assert "after round 3" in notes[1] and "federation.rounds = 4 (was 3)" in notes[1]
    scenario = tomllib.loads(text)  # still a valid scenario, holding the latest values
    assert scenario["train"]["lr"] == 0.05 and scenario["federation"]["rounds"] == 4
    assert fedlt.load_scenario(run / "scenario.toml").train.lr == 0.05

    # A plain resume of the finished run trains nothing and records nothing.
    assert main(["resume", str(run), "--quiet"]) == 0
    assert len(_summary(run)["resumes"]) == 2


def test_training_loss_is_recorded_every_round(tmp_path: Path, interrupted_run, restore_threads) -> None:
    whole = tmp_path / "whole"
    fedlt.run(_scenario(rounds=4, eval_every=3), out=whole)
    rounds = _jsonl(whole / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["train_loss"] > 0 for r in rounds)
    evaluated = {m["round"]: m["train_loss"] for m in _jsonl(whole / "metrics.jsonl")}
    assert sorted(evaluated) == [3, 4]  # evaluations: every 3 rounds and the last
    assert all(rounds[r - 1]["train_loss"] == loss for r, loss in evaluated.items())

    # Killed after round 3 with a checkpoint of round 2: resumed, the lines are those of the whole run.
    cut = tmp_path / "cut"
    s = _scenario(rounds=4, eval_every=3)
    s["checkpoint"] = {"every": 2}
    interrupted_run(s, cut, 3)
    assert [r["round"] for r in _jsonl(cut / "rounds.jsonl")] == [1, 2]  # written with the checkpoint
    fedlt.resume(cut)
    assert _jsonl(cut / "rounds.jsonl") == rounds


def test_wandb_run_ids_are_kept_in_the_folder_and_never_shared(tmp_path: Path, monkeypatch) -> None:
    a, b = tmp_path / "a" / "same-name", tmp_path / "b" / "same-name"  # paths that end alike
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    first = wandb_run_id(a)
    assert wandb_run_id(a) == first == (a / "wandb-id").read_text().strip()
    assert wandb_run_id(b) != first

    # The logger opens its W&B run with that id.
    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> Any:
        seen.update(kwargs)
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    WandbLog().server_setup(ctx=types.SimpleNamespace(run_dir=a))
    assert seen["id"] == first and seen["resume"] == "allow"
