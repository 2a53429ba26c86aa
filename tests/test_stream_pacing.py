"""stream.pacing (every client ends each task in the same round) and stream.seed (the data's own
seed), on hand-worked task sizes and on runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import fedlt
from fedlt.data.stream import ClientStream, ProportionalPacing, Task
from fedlt.driver.runner import Run
from fedlt.metrics.continual import federation_task_ends
from fedlt.prepare import prepare


def _stream(sizes: list[int]) -> ClientStream:
    start = np.cumsum([0, *sizes])
    return ClientStream(
        tasks=tuple(Task(np.arange(a, b), (), 0) for a, b in itertools.pairwise(start.tolist()))
    )


def test_proportional_pacing_on_hand_worked_task_sizes() -> None:
    # Client 0's tasks hold 4, 8, 0 samples, client 1's 6, 2, 3; samples_per_round = 4.
    pacing = ProportionalPacing.of([_stream([4, 8, 0]), _stream([6, 2, 3])], 4)
    # R_t = ceil(largest task t / 4) = ceil(6/4), ceil(8/4), ceil(3/4) = 2, 2, 1 rounds.
    assert pacing.task_rounds == (2, 2, 1)
    assert pacing.task_end_rounds == [2, 4, 5]
    # After r rounds: b_{k,t-1} + floor(|task_{k,t}| * j / R_t), j = rounds into task t.
    # Client 0: 0, floor(4/2)=2, 4, 4+floor(8/2)=8, 12, 12 (its task 2 is empty), 12 after the end.
    assert [pacing.position(0, r) for r in range(7)] == [0, 2, 4, 8, 12, 12, 12]
    # Client 1: 0, floor(6/2)=3, 6, 6+floor(2/2)=7, 8, 8+3=11, 11.
    assert [pacing.position(1, r) for r in range(7)] == [0, 3, 6, 7, 8, 11, 11]
    # At the task-end rounds both stand exactly at their boundaries (4, 12, 12) and (6, 8, 11).
    assert [pacing.position(0, r) for r in pacing.task_end_rounds] == [4, 12, 12]
    assert [pacing.position(1, r) for r in pacing.task_end_rounds] == [6, 8, 11]


def test_a_task_empty_everywhere_lasts_no_round() -> None:
    pacing = ProportionalPacing.of([_stream([3, 0, 5]), _stream([1, 0, 2])], 2)
    assert pacing.task_rounds == (2, 0, 3) and pacing.task_end_rounds == [2, 2, 5]
    # Client 0: floor(3/2)=1, 3, then task 2 over 3 rounds: 3+floor(5/3)=4, 3+floor(10/3)=6, 8.
    assert [pacing.position(0, r) for r in range(6)] == [0, 1, 3, 4, 6, 8]


def test_pacing_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="samples_per_round must be an int >= 1, got 0"):
        ProportionalPacing.of([_stream([1])], 0)
    with pytest.raises(ValueError, match="same number of tasks"):
        ProportionalPacing.of([_stream([1]), _stream([1, 1])], 2)


def _continual(tiny: dict, pacing: str) -> dict:
    tiny["stream"] = {
        "kind": "si-blurry",
        "schedule": "shared",
        "n_tasks": 3,
        "samples_per_round": 24,
        "pacing": pacing,
        "eval_period": 40,
    }
    tiny["federation"].update(rounds=60, fraction_clients=1.0, eval_every=0)
    return tiny


def _positions_by_round(scenario: dict, out) -> tuple[Run, list[dict[int, int]]]:
    run = Run.create(fedlt.load_scenario(scenario), out)
    seen: list[dict[int, int]] = []
    run.on_round = lambda r, record: seen.append(dict(run.views.positions))
    run.execute()
    return run, seen


def test_proportional_pacing_ends_every_clients_task_in_the_same_round(tiny, tmp_path) -> None:
    run, positions = _positions_by_round(_continual(tiny, "proportional"), tmp_path / "p")
    bounds = [s.boundaries for s in run.data.streams]
    pacing = run.views.pacing
    assert pacing is not None
    for t, r in enumerate(pacing.task_end_rounds):
        # After task t's last round every client stands exactly at its own boundary b_{k,t} ...
        assert {k: positions[r - 1].get(k, 0) for k in range(len(bounds))} == {
            k: b[t] for k, b in enumerate(bounds)
        }
        # ... and not one round earlier (the task really ends in that round everywhere).
        if r > 1 and pacing.task_rounds[t]:
            assert any(positions[r - 2].get(k, 0) < b[t] for k, b in enumerate(bounds) if b[t])
    # No client reads faster than samples_per_round.
    steps = np.diff([[p.get(k, 0) for k in range(len(bounds))] for p in [{}, *positions]], axis=0)
    assert steps.max() <= 24
    # The task-end records (A_avg, F_last, task x class rows) are those rounds, at E_t samples.
    ends = federation_task_ends(bounds)
    history = fedlt.history(tmp_path / "p")
    rows = [(h["round"], h["samples_seen"], h["task_end"]) for h in history if h["task_end"]]
    assert rows == [(r, ends[t], [t]) for t, r in enumerate(pacing.task_end_rounds)]


def test_constant_pacing_ends_the_federations_task_at_mixed_client_positions(tiny, tmp_path) -> None:
    # The point, on this scenario: when the federation's count passes E_0, some clients
    # have not finished task 0 while others are already past it.
    run, positions = _positions_by_round(_continual(tiny, "constant"), tmp_path / "c")
    bounds = [s.boundaries for s in run.data.streams]
    first = next(h for h in fedlt.history(tmp_path / "c") if h["task_end"])
    at = [positions[first["round"] - 1].get(k, 0) for k in range(len(bounds))]
    assert any(p < b[0] for p, b in zip(at, bounds, strict=True))
    assert any(p > b[0] for p, b in zip(at, bounds, strict=True))


def test_proportional_pacing_is_refused_in_asynchronous_modes(tiny) -> None:
    scenario = _continual(tiny, "proportional")
    scenario["federation"].update(mode="async", concurrency=2, fraction_clients=0.5)
    with pytest.raises(fedlt.ScenarioError, match=r"stream\.pacing.*'constant' with federation\.mode"):
        fedlt.load_scenario(scenario)


# --------------------------------------------------------------------------- stream.seed


def _built(tiny: dict, seed: int, stream_seed: int | None):
    scenario = _continual(tiny, "constant")
    scenario["seed"] = seed
    if stream_seed is not None:
        scenario["stream"]["seed"] = stream_seed
    p = prepare(fedlt.load_scenario(scenario))
    streams = [s.indices.tolist() for s in p.data.streams]
    return streams, {k: v.clone() for k, v in p.model.state_dict().items()}


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stream_seed_changes_the_streams_not_the_model_and_vice_versa(tiny) -> None:
    base_streams, base_model = _built(dict(tiny), seed=3, stream_seed=None)
    # Unset, the data follows the scenario's seed: setting it to that seed changes nothing.
    same_streams, same_model = _built(dict(tiny), seed=3, stream_seed=3)
    assert same_streams == base_streams and _same_weights(same_model, base_model)
    # Another stream seed: other streams, the same initial model.
    other_streams, other_model = _built(dict(tiny), seed=3, stream_seed=11)
    assert other_streams != base_streams and _same_weights(other_model, base_model)
    # Another run seed with the stream seed kept: the same streams, another initial model.
    kept_streams, new_model = _built(dict(tiny), seed=4, stream_seed=3)
    assert kept_streams == base_streams and not _same_weights(new_model, base_model)


def test_stream_seed_without_a_stream_is_refused(tiny) -> None:
    tiny["stream"] = {"seed": 5}
    with pytest.raises(fedlt.ScenarioError, match=r"stream\.seed.*unset with stream\.kind = 'none'"):
        fedlt.load_scenario(tiny)
