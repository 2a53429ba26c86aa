"""Federation modes on the virtual clock, against hand-worked timelines and the papers' formulas.

Clients train ``local_steps = 1`` batch of 32, so with a speed trace of 32, 16, 8, 4 samples per
second their rounds last 1, 2, 4, 8 virtual seconds: every event time, arrival order (ties by
client id) and staleness below is worked out by hand or by a two-line rule written here, not by
fedlt. The staleness weights and the FedAsync / FedBuff steps are checked against their
formulas; async runs are checked to be the same on every engine and after a resume.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from support.scenarios import TINY

import fedlt
from fedlt.driver.runner import Run
from fedlt.errors import PluginError, ScenarioError
from fedlt.hooks.context import Arrival
from fedlt.server.aggregation import FedAsync, FedBuff
from fedlt.server.staleness import staleness_weight

SUPPORT = Path(__file__).parent / "support"


@pytest.fixture
def test_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    names = ("Recorder", "PickLowest", "RefreshToGlobal", "HoldTwo", "KeepUpdates")
    spec = ",".join(f"{n.lower()}=support.test_plugins:{n}" for n in names)
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", spec)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SUPPORT.parent), os.environ.get("PYTHONPATH", "")]))


def scenario(tmp_path: Path, n: int = 3, speeds: tuple[float, ...] = (32, 16, 8), **sections: Any) -> dict:
    trace = tmp_path / "speeds.csv"
    trace.write_text("client,speed\n" + "".join(f"{c},{s}\n" for c, s in enumerate(speeds[:n])))
    s = copy.deepcopy(TINY)
    s["partition"]["n_clients"] = n
    s["train"] = {"local_steps": 1, "batch_size": 32, "lr": 0.1}
    s["system"] = {"speed": "trace", "speed_trace": str(trace)}
    s["federation"].update(rounds=12, fraction_clients=1.0, eval_every=0)
    for key, value in sections.items():
        s[key] = {**s.get(key, {}), **value}
    return s


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["event"] == kind]


def hand_arrivals(durations: list[float], count: int) -> list[tuple[float, int]]:
    """Every client always in flight: client c's k-th update arrives at k * d_c; ties by client id."""
    times = [(k * d, c) for c, d in enumerate(durations) for k in range(1, count + 1)]
    return sorted(times)[:count]


# --------------------------------------------------------------------------- the formulas


def test_staleness_weights_are_the_papers_functions() -> None:
    poly = staleness_weight("polynomial", a=0.5)
    hinge = staleness_weight("hinge", a=2.0, b=3.0)
    assert [poly(x) for x in (0, 3, 8)] == pytest.approx([1.0, 0.5, 1 / 3])  # FedBuff's 1/sqrt(1+x)
    assert [hinge(x) for x in (0, 3, 4, 6)] == pytest.approx([1.0, 1.0, 1 / 3, 1 / 7])
    assert staleness_weight("constant")(100) == 1.0


def _arrival(staleness: int, base: dict[str, torch.Tensor]) -> Arrival:
    return Arrival(0, 0, staleness, 0.0, 1.0, base)


def test_fedasync_mixes_each_arrival_by_alpha_times_its_staleness_weight() -> None:
    x, new = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}
    agg = FedAsync(x, 0.6, staleness_weight("polynomial", 0.5), [_arrival(3, x)])
    agg.add(new, 10, 0)
    a = 0.6 * 4**-0.5  # alpha * (3 + 1)^(-1/2) = 0.3
    assert agg.result()["w"].tolist() == pytest.approx([(1 - a) * 1 + a * 3, (1 - a) * 2 + a * -2])
    assert x["w"].tolist() == [1.0, 2.0]  # the global weights it was given are untouched


def test_fedbuff_steps_by_the_mean_weighted_delta_from_each_base() -> None:
    x = {"w": torch.tensor([1.0])}
    base0, base1 = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}
    arrivals = [_arrival(0, base0), _arrival(3, base1)]
    agg = FedBuff(x, 2.0, staleness_weight("polynomial", 0.5), arrivals)
    agg.add({"w": torch.tensor([4.0])}, 5, 0)  # delta 4, weight 1
    agg.add({"w": torch.tensor([3.0])}, 50, 1)  # delta 2, weight 1/2 (sample counts do not matter)
    assert agg.result()["w"].item() == pytest.approx(1 + 2.0 * (4 + 0.5 * 2) / 2)


# --------------------------------------------------------------------------- hand-worked timelines


def test_sync_rounds_last_as_long_as_their_slowest_client(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4))
    s["federation"].update(rounds=3, eval_every=1)
    fedlt.run(s, out=tmp_path / "r")
    records = fedlt.history(tmp_path / "r")
    assert [r["virtual_time"] for r in records] == [8.0, 16.0, 24.0]
    assert [(e["t"], e["client"]) for e in events(tmp_path / "r", "arrive")][:4] == [
        (1.0, 0),
        (2.0, 1),
        (4.0, 2),
        (8.0, 3),
    ]


def test_a_sync_run_keeps_todays_numbers_whatever_the_clock(tmp_path: Path) -> None:
    """Speeds change the clock only: a sync run's weights are those of a run without [system]."""
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4))
    s["federation"].update(rounds=3, fraction_clients=0.5)
    plain = copy.deepcopy(s)
    del plain["system"]
    a = fedlt.run(s, out=tmp_path / "a")
    b = fedlt.run(plain, out=tmp_path / "b")
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["global"]
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["global"]
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    assert a["final"]["accuracy"] == b["final"]["accuracy"]
    assert b["final"]["virtual_time"] == pytest.approx(3 * 32 / 100)  # default: 100 samples/s


def test_deadline_keeps_the_first_k_arrivals_and_ends_at_the_kth(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4))
    # k = 2 of 4, over-selected to all 4; deadline 5 s: clients 0 (1 s), 1 (2 s) arrive first.
    s["federation"].update(
        rounds=3, fraction_clients=0.5, mode="deadline", deadline=5.0, over_selection=2.0, eval_every=1
    )
    fedlt.run(s, out=tmp_path / "r")
    assert [r["virtual_time"] for r in fedlt.history(tmp_path / "r")] == [2.0, 4.0, 6.0]
    first = [e for e in events(tmp_path / "r") if e["event"] in ("arrive", "late")][:4]
    assert {(e["event"], e["client"]) for e in first} == {
        ("arrive", 0),
        ("arrive", 1),
        ("late", 2),
        ("late", 3),
    }


def test_deadline_rounds_wait_until_the_deadline_when_fewer_than_k_arrive(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4))
    s["federation"].update(
        rounds=2, fraction_clients=0.5, mode="deadline", deadline=1.5, over_selection=2.0, eval_every=1
    )
    fedlt.run(s, out=tmp_path / "r")
    assert [r["virtual_time"] for r in fedlt.history(tmp_path / "r")] == [1.5, 3.0]
    assert [e["client"] for e in events(tmp_path / "r", "arrive")] == [0, 0]


def test_async_applies_arrivals_in_virtual_time_order_with_their_staleness(
    tmp_path: Path, test_plugins
) -> None:
    s = scenario(tmp_path, federation={"mode": "async", "concurrency": 3})
    s["plugins"] = [{"name": "recorder"}]
    run = Run.create(fedlt.load_scenario(s), tmp_path / "r")
    run.execute()
    expected = hand_arrivals([1.0, 2.0, 4.0], 12)
    got = events(tmp_path / "r", "arrive")
    assert [(e["t"], e["client"]) for e in got] == expected
    # Update i (from 0) comes from a client started right after its previous update was applied.
    previous: dict[int, int] = {}
    stale = []
    for i, (_, c) in enumerate(expected):
        stale.append(i - previous.get(c, 0))
        previous[c] = i + 1
    assert [e["staleness"] for e in got] == stale
    seen = run.hooks.plugins[0].seen
    assert [x["arrivals"] for x in seen] == [
        [(c, st, i - st, False)] for i, ((_, c), st) in enumerate(zip(expected, stale, strict=True))
    ]
    assert all(x["mode"] == "async" for x in seen) and [x["t"] for x in seen] == [t for t, _ in expected]


def test_buffered_updates_every_k_arrivals(tmp_path: Path, test_plugins) -> None:
    s = scenario(tmp_path, federation={"mode": "buffered", "concurrency": 3, "buffer_size": 2, "rounds": 6})
    s["plugins"] = [{"name": "recorder"}]
    run = Run.create(fedlt.load_scenario(s), tmp_path / "r")
    run.execute()
    expected = hand_arrivals([1.0, 2.0, 4.0], 12)
    got = events(tmp_path / "r", "arrive")
    assert [(e["t"], e["client"]) for e in got] == expected
    # Version at arrival i: floor(i / K); a client's base: the version when its previous update arrived.
    base: dict[int, int] = {}
    stale = []
    for i, (_, c) in enumerate(expected):
        stale.append(i // 2 - base.get(c, 0))
        base[c] = (i + 1) // 2
    assert [e["staleness"] for e in got] == stale
    assert [len(x["arrivals"]) for x in run.hooks.plugins[0].seen] == [2] * 6
    assert [e["t"] for e in events(tmp_path / "r", "update")] == [t for t, _ in expected[1::2]]


def test_a_client_started_twice_from_one_version_draws_afresh(tmp_path: Path, test_plugins) -> None:
    """FedBuff, one client in flight, K = 3: client 0 starts three times from version 0 with the
    same weights and state; only its seeds (its start number) can make the updates differ."""
    s = scenario(
        tmp_path, n=2, federation={"mode": "buffered", "concurrency": 1, "buffer_size": 3, "rounds": 1}
    )
    s["plugins"] = [{"name": "picklowest"}, {"name": "keepupdates"}]
    run = Run.create(fedlt.load_scenario(s), tmp_path / "r")
    run.execute()
    assert [(e["client"], e["version"]) for e in events(tmp_path / "r", "start")][:3] == [(0, 0)] * 3
    updates = run.hooks.plugins[1].updates
    assert [c for c, _ in updates] == [0, 0, 0]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(updates[i][1][k], updates[j][1][k]) for k in updates[i][1])


def test_dropouts_never_arrive_and_free_their_slot(tmp_path: Path) -> None:
    s = scenario(
        tmp_path, n=3, federation={"mode": "async", "concurrency": 2, "rounds": 40}, system={"dropout": 0.3}
    )
    summary = fedlt.run(s, out=tmp_path / "r")
    fed = summary["federation"]
    assert fed["arrivals"] == 40 and fed["dropped"] > 0
    assert fed["starts"] == fed["arrivals"] + fed["dropped"] + 2  # two still in flight at the end
    assert fed["dropped"] / fed["starts"] == pytest.approx(0.3, abs=0.15)
    assert sum(fed["staleness_histogram"].values()) == 40


def test_an_offline_stretch_drops_a_client_and_a_trace_that_ends_stops_the_run(tmp_path: Path) -> None:
    avail = tmp_path / "avail.csv"
    # Client 0 online [0, 2.5): its rounds of 1 s arrive at 1, 2, then it drops at 2.5.
    avail.write_text("client,available_from,available_to\n0,0,2.5\n1,0,1\n")
    s = scenario(
        tmp_path,
        n=2,
        federation={"mode": "async", "concurrency": 2, "rounds": 10},
        system={"availability": "trace", "availability_trace": str(avail)},
    )
    summary = fedlt.run(s, out=tmp_path / "r")
    assert [(e["t"], e["client"]) for e in events(tmp_path / "r", "arrive")] == [(1.0, 0), (2.0, 0)]
    assert [(e["t"], e["client"]) for e in events(tmp_path / "r", "drop")] == [(1.0, 1), (2.5, 0)]
    assert "no client can start after virtual time 2.5" in summary["stopped_early"]


# --------------------------------------------------------------------------- hooks


def test_a_selection_plugin_chooses_among_the_online_idle_clients(tmp_path: Path, test_plugins) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), federation={"rounds": 2, "fraction_clients": 0.5})
    s["plugins"] = [{"name": "picklowest"}]
    run = Run.create(fedlt.load_scenario(s), tmp_path / "r")
    run.execute()
    assert run.hooks.plugins[0].calls == [([0, 1, 2, 3], 2)] * 2
    assert [e["client"] for e in events(tmp_path / "r", "start")] == [0, 1, 0, 1]

    s["federation"].update(mode="async", concurrency=2, rounds=3, fraction_clients=1.0)
    run = Run.create(fedlt.load_scenario(s), tmp_path / "a")
    run.execute()
    calls = run.hooks.plugins[0].calls
    assert calls[0] == ([0, 1, 2, 3], 2)  # both slots at t = 0
    assert calls[1] == ([0, 2, 3], 1)  # client 0 arrived at 1 s: idle again; client 1 still busy


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("stranger", "not a candidate"),
        ("twice", "a client twice"),
        ("many", "expected 1 to k"),
        ("empty", "expected 1 to k"),
    ],
)
def test_a_selection_that_breaks_the_contract_names_the_plugin(
    tmp_path: Path, test_plugins, bad, words
) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), federation={"rounds": 1, "fraction_clients": 0.5})
    s["plugins"] = [{"name": "picklowest", "bad": bad}]
    with pytest.raises(PluginError, match="server_select_clients") as info:
        fedlt.run(s, out=tmp_path / "r")
    assert words in str(info.value) and "picklowest" in str(info.value)


def test_a_refreshed_update_counts_as_fresh(tmp_path: Path, test_plugins) -> None:
    s = scenario(tmp_path, federation={"mode": "async", "concurrency": 3, "rounds": 8})
    s["plugins"] = [{"name": "refreshtoglobal"}, {"name": "recorder"}]
    run = Run.create(fedlt.load_scenario(s), tmp_path / "r")
    summary = run.execute()
    seen = [a for x in run.hooks.plugins[1].seen for a in x["arrivals"]]
    stale = [e["staleness"] for e in events(tmp_path / "r", "arrive")]
    assert [a[1] for a in seen] == [0] * 8  # staleness 0 once refreshed
    assert [a[3] for a in seen] == [st > 0 for st in stale]
    assert summary["federation"]["refreshed"] == sum(st > 0 for st in stale) > 0


def test_an_aggregator_may_hold_updates_across_server_updates_and_resume(
    tmp_path: Path, test_plugins, interrupted_run
) -> None:
    s = scenario(tmp_path, federation={"mode": "async", "concurrency": 3, "rounds": 5, "eval_every": 1})
    s["plugins"] = [{"name": "holdtwo"}]
    full = fedlt.run(s, out=tmp_path / "full")
    # Updates 1, 3, 5 are held (the model stays), 2 and 4 apply the mean of two.
    same = lambda r: {k: v for k, v in r.items() if k not in ("round", "train_loss", "virtual_time")}  # noqa: E731
    h = fedlt.history(tmp_path / "full")
    assert same(h[2]) == same(h[1]) and same(h[4]) == same(h[3]) and same(h[1]) != same(h[0])
    interrupted_run(s, tmp_path / "cut", after=3)  # one update held in the plugin's state
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"] == full["final"]


# --------------------------------------------------------------------------- guarantees


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["global"]


ASYNC_CASES = {
    "async": {"federation": {"mode": "async", "concurrency": 3, "rounds": 8, "eval_every": 2}},
    "buffered": {
        "federation": {"mode": "buffered", "concurrency": 3, "buffer_size": 2, "rounds": 6, "eval_every": 2},
        "system": {"dropout": 0.2},
    },
}


@pytest.mark.parametrize("case", sorted(ASYNC_CASES))
def test_an_interrupted_async_run_resumes_to_the_same_numbers_and_timeline(
    tmp_path: Path, interrupted_run, case: str
) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), **copy.deepcopy(ASYNC_CASES[case]))
    s["system"].update(speed="lognormal", speed_sigma=0.8, latency=0.1)
    s["system"].pop("speed_trace")
    full = fedlt.run(s, out=tmp_path / "full")
    interrupted_run(s, tmp_path / "cut", after=3)
    resumed = fedlt.resume(tmp_path / "cut")
    assert resumed["final"] == full["final"] and resumed["federation"] == full["federation"]
    w1, w2 = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert events(tmp_path / "cut") == events(tmp_path / "full")
    assert fedlt.history(tmp_path / "cut") == fedlt.history(tmp_path / "full")


def test_async_numbers_do_not_depend_on_the_vectorized_engine(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), **copy.deepcopy(ASYNC_CASES["async"]))
    a = fedlt.run(s, out=tmp_path / "serial")
    s["engine"] = {"threads": 1, "vectorize": "on"}
    b = fedlt.run(s, out=tmp_path / "vectorized")
    assert events(tmp_path / "serial") == events(tmp_path / "vectorized")
    assert a["final"]["accuracy"] == pytest.approx(b["final"]["accuracy"], abs=0.02)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"federation.mode": "lazy"}, "federation.mode", "sync"),
        ({"federation.mode": "deadline"}, "federation.deadline", "set with federation.mode = 'deadline'"),
        ({"federation.deadline": 3.0}, "federation.deadline", "unset with federation.mode = 'sync'"),
        (
            {"federation.mode": "async", "federation.buffer_size": 4},
            "federation.buffer_size",
            "mode 'buffered'",
        ),
        (
            {"federation.mode": "async", "federation.concurrency": 9},
            "federation.concurrency",
            "at most partition",
        ),
        (
            {"federation.mode": "async", "system.availability": "bernoulli"},
            "system.availability_window",
            "per window",
        ),
        (
            {"system.speed": "tiers", "system.speed_tiers": [[0.5, 10.0], [0.4, 1.0]]},
            "system.speed_tiers",
            "to 1",
        ),
        (
            {"system.speed": "uniform", "system.speed_low": 50.0, "system.speed_high": 5.0},
            "system.speed_low",
            "at most",
        ),
        ({"system.speed": "trace"}, "system.speed_trace", "a CSV file"),
        ({"system.availability": "trace"}, "system.availability_trace", "a CSV file"),
        ({"system.dropout": 1.0}, "system.dropout", "less than 1"),
        ({"system.speed": "fast"}, "system.speed", "lognormal"),
        ({"eval.time_to_accuracy": [0.5, 1.5]}, "eval.time_to_accuracy", "(0, 1]"),
    ],
)
def test_bad_federation_and_system_keys_exit_2_naming_key_and_value(
    tmp_path: Path, capsys, change: dict, key: str, words: str
) -> None:
    from fedlt.cli import main
    from fedlt.scenario.config import scenario_to_toml

    s = copy.deepcopy(TINY)
    path = tmp_path / "s.toml"
    path.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    sets = [a for k, v in change.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["validate", str(path), *sets]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert key in err and words in err, err


def test_a_deadline_no_client_can_meet_is_refused_before_training(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4))
    s["federation"].update(mode="deadline", deadline=0.5)
    with pytest.raises(ScenarioError, match=r"federation.deadline.*at least 1 virtual seconds"):
        fedlt.run(s, out=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_trace_naming_unknown_clients_is_refused_by_validate(tmp_path: Path, capsys) -> None:
    from fedlt.cli import main
    from fedlt.scenario.config import scenario_to_toml

    s = scenario(tmp_path, n=2, speeds=(32, 16, 8))
    path = tmp_path / "s.toml"
    path.write_text(scenario_to_toml(fedlt.load_scenario(s)))
    Path(s["system"]["speed_trace"]).write_text("client,speed\n0,1\n1,1\n5,1\n")
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "system.speed_trace" in err and "Line 4 names client '5'" in err, err


def test_time_to_accuracy_reports_the_first_evaluation_reaching_each_target(tmp_path: Path) -> None:
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), eval={"time_to_accuracy": [0.05, 0.999]})
    s["federation"].update(rounds=3, eval_every=1)
    summary = fedlt.run(s, out=tmp_path / "r")
    first = fedlt.history(tmp_path / "r")[0]
    assert first["accuracy"] >= 0.05
    assert summary["time_to_accuracy"] == {"0.05": {"round": 1, "virtual_time": 8.0}, "0.999": None}
    assert math.isclose(summary["federation"]["virtual_time"], 24.0)


def test_sync_rounds_start_only_clients_online_in_their_round(tmp_path: Path) -> None:
    """Bernoulli availability per round: a client starts in round r only if its draw
    hash_uniform(seed, "system-online", client, r) < p, computed here; and k of them when enough are."""
    from fedlt.base.seeding import hash_uniform

    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), federation={"rounds": 8, "fraction_clients": 0.5})
    s["system"].update(availability="bernoulli", availability_p=0.5)
    fedlt.run(s, out=tmp_path / "r")
    starts = events(tmp_path / "r", "start")
    updates = events(tmp_path / "r", "update")
    assert len(updates) == 8
    by_round: dict[int, list[int]] = {}
    for e in starts:
        by_round.setdefault(e["version"] + 1, []).append(e["client"])
    for r in range(1, 9):
        online = [c for c in range(4) if hash_uniform(TINY["seed"], "system-online", c, r) < 0.5]
        chosen = by_round.get(r, [])
        assert set(chosen) <= set(online)
        assert len(chosen) == min(2, len(online))


def test_an_async_checkpoint_holds_each_in_flight_base_once_as_the_global_weights_of_its_version(
    tmp_path: Path,
) -> None:
    """The bases in-flight clients started from are packed one row per version; each row is the
    global model after that server update, read from a run stopped there (independent of the
    packing), and the current version's is left out only when it equals the saved weights."""
    s = scenario(tmp_path, n=4, speeds=(32, 16, 8, 4), **copy.deepcopy(ASYNC_CASES["async"]))
    fedlt.run(s, out=tmp_path / "full")
    saved = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    bases, flights = saved["federation"]["bases"], saved["federation"]["flights"]
    started = {f["base_version"] for f in flights if f["arrives"]}
    assert sorted(bases["versions"]) == bases["versions"]
    current = {saved["federation"]["version"]} if bases["current"] else set()
    assert set(bases["versions"]) | current == started
    assert bases["current"] == (8 in started)
    (packed,) = bases["packed"].values()
    assert packed.shape[0] == len(bases["versions"])
    for row, version in zip(packed, bases["versions"], strict=True):
        cut = copy.deepcopy(s)
        cut["federation"]["rounds"] = version
        fedlt.run(cut, out=tmp_path / f"v{version}")
        weights = _weights(tmp_path / f"v{version}")
        assert torch.equal(row, torch.cat([w.reshape(-1) for w in weights.values()]))


def test_a_checkpoint_with_bases_saved_per_version_still_loads() -> None:
    """Checkpoints written before the bases were packed hold ``{version: {dtype: flat}}``."""
    from fedlt.server.federation import _unpacked_bases

    like = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0, 8.0])}
    legacy = {4: {"float32": torch.tensor([1.0, 2, 3, 4, 5, 6, 9, 10])}}
    base = _unpacked_bases(legacy, like, torch.device("cpu"), version=6)[4]
    legacy[4]["float32"].zero_()  # the loaded base owns its memory
    assert torch.equal(base["w"], torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert torch.equal(base["b"], torch.tensor([9.0, 10]))
