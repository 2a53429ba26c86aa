"""fedlt.analysis.compare: grouping by experiment, means, sample std, t intervals and paired differences.

Run folders are written by hand (summary.json + scenario.toml with known numbers); every expected
statistic is computed here from the textbook formulas, with t quantiles copied from a t table.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedlt.analysis.compare import (
    DEFAULT_METRICS,
    ComparisonTable,
    RunRecord,
    collect_runs,
    compare,
    load_run,
    summarize,
    t_quantile_975,
)

#: t_{0.975, df} from a printed t table (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 30: 2.042}


def write_run(
    folder: Path,
    final: dict[str, Any],
    seed: int,
    lr: float = 0.1,
    plugins: list[dict[str, Any]] | None = None,
    scenario_extra: dict[str, Any] | None = None,
    summary_extra: dict[str, Any] | None = None,
    with_scenario: bool = True,
) -> Path:
    """A finished run folder: scenario.toml (as fedlt writes it, plugins inline) and summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    scenario: dict[str, Any] = {"name": "hand", "seed": seed, "train": {"lr": lr}}
    for key, value in (scenario_extra or {}).items():
        if isinstance(value, dict):
            scenario.setdefault(key, {}).update(value)
        else:
            scenario[key] = value
    if plugins:
        scenario["plugins"] = plugins
    if with_scenario:
        (folder / "scenario.toml").write_text(tomli_w.dumps(scenario))
    summary = {
        "scenario": scenario["name"],
        "rounds": 3,
        "engine": "serial",
        "seed": seed,
        "plugins": [p["name"] for p in plugins or []],
        "final": final,
        "wall_seconds": 1.0,
        **(summary_extra or {}),
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_interval(xs: list[float], t: float) -> tuple[float, float]:
    half = t * sample_std(xs) / math.sqrt(len(xs))
    return mean(xs) - half, mean(xs) + half


# t quantiles to 6 decimals (where the table above has 3), for comparisons at 1e-6.
T6 = {1: 12.706205, 2: 4.302653, 3: 3.182446}


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """Three experiments over seeds; one baseline run differs only in output-only settings.

    - A (baseline, lr 0.1): seeds 0, 1, 2, 3; balanced accuracy 0.50, 0.60, 0.70, 0.40
    - B (lr 0.05): seeds 2, 0, 1 (written out of order); 0.80, 0.55, 0.62
    - C (focal, gamma 2): seeds 1, 2, 7; 0.65, 0.66, 0.90
    """
    root = tmp_path / "runs"
    for seed, bacc, tail in ((0, 0.50, 0.10), (1, 0.60, 0.20), (2, 0.70, 0.15)):
        write_run(root / f"a-s{seed}", {"balanced_accuracy": bacc, "tail_accuracy": tail}, seed)
    # Same experiment: another name, engine and checkpoint settings, data location.
    write_run(
        root / "nested" / "a-s3",
        {"balanced_accuracy": 0.40, "tail_accuracy": None},
        3,
        scenario_extra={
            "name": "renamed",
            "engine": {"threads": 4, "kind": "serial"},
            "checkpoint": {"every": 5},
            "eval": {"batch_size": 64},
        },
    )
    for seed, bacc in ((2, 0.80), (0, 0.55), (1, 0.62)):
        write_run(root / f"b-s{seed}", {"balanced_accuracy": bacc, "tail_accuracy": 0.3}, seed, lr=0.05)
    focal = [{"name": "focal", "gamma": 2.0}]
    for seed, bacc in ((1, 0.65), (2, 0.66), (7, 0.90)):
        write_run(root / f"c-s{seed}", {"balanced_accuracy": bacc, "tail_accuracy": 0.3}, seed, plugins=focal)
    return root


A_LABEL = "plugins=[], train.lr=0.1"
B_LABEL = "plugins=[], train.lr=0.05"
C_LABEL = "plugins=[focal(gamma=2.0)], train.lr=0.1"


# --------------------------------------------------------------------------- t quantiles


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_the_printed_table(df: int) -> None:
    assert t_quantile_975(df) == pytest.approx(T_TABLE[df], abs=5e-4)
    assert t_quantile_975(df, use_scipy=False) == pytest.approx(T_TABLE[df], abs=5e-4)


def test_t_table_fallback_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy now raises ImportError
    assert t_quantile_975(4) == pytest.approx(2.776445, abs=1e-6)
    # Between rows: interpolated in 1/df. Exact values t(50) = 2.008559, t(1000) = 1.962339.
    assert t_quantile_975(50) == pytest.approx(2.008559, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.962339, abs=1e-3)
    assert t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)  # the normal quantile
    with pytest.raises(ValueError, match=">= 1"):
        t_quantile_975(0)


def test_summarize_by_hand() -> None:
    xs = [0.5, 0.6, 0.7, 0.8]
    s = summarize(xs)
    # mean 0.65; squared deviations 0.0225 + 0.0025 + 0.0025 + 0.0225 = 0.05; var = 0.05 / 3
    assert s.n == 4 and s.mean == pytest.approx(0.65)
    assert s.std == pytest.approx(math.sqrt(0.05 / 3))
    half = T6[3] * math.sqrt(0.05 / 3) / 2
    assert (s.ci_low, s.ci_high) == (
        pytest.approx(0.65 - half, abs=1e-6),
        pytest.approx(0.65 + half, abs=1e-6),
    )
    one = summarize([0.3])
    assert (one.n, one.mean, one.std, one.ci_low, one.ci_high) == (1, 0.3, None, None, None)
    assert summarize([]).mean is None


# --------------------------------------------------------------------------- collecting runs


def test_collect_runs_finds_run_folders_once(grid: Path, tmp_path: Path) -> None:
    runs = collect_runs(grid)
    assert len(runs) == 10
    assert [r.name for r in runs][:4] == ["a-s0", "a-s1", "a-s2", "b-s0"]  # sorted paths
    # A run named directly, plus the folder that holds it: still once.
    again = collect_runs([grid / "a-s0", grid])
    assert len(again) == 10 and again[0].name == "a-s0"
    assert collect_runs(str(grid / "nested" / "a-s3"))[0].seed == 3


def test_collect_runs_skips_unfinished_runs_with_a_warning(grid: Path) -> None:
    live = grid / "live"
    live.mkdir()
    (live / "scenario.toml").write_text('name = "x"\n')
    with pytest.warns(UserWarning, match="skipped unfinished runs"):
        runs = collect_runs(grid)
    assert "live" not in [r.name for r in runs]
    with pytest.raises(FileNotFoundError, match=r"no summary\.json"):
        collect_runs(live)


def test_collect_runs_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folders"):
        collect_runs(tmp_path / "empty")


def test_load_run_reads_defensively(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "r",
        {"accuracy": 0.5, "balanced_accuracy": "n/a", "auroc_macro": float("nan"), "tail_accuracy": True},
        seed=4,
        summary_extra={"git_commit": "abc", "machine": {"cpu": "x"}},  # keys added by later versions
    )
    rec = load_run(run)
    assert rec.metric("accuracy") == 0.5
    assert rec.metric("balanced_accuracy") is None  # not a number
    assert rec.metric("auroc_macro") is None  # not finite
    assert rec.metric("tail_accuracy") is None  # a bool is not a metric
    assert rec.metric("absent") is None
    assert (
        rec.scenario["train"]["lr"] == 0.1 and rec.scenario["partition"]["n_clients"] == 10
    )  # defaults filled


# --------------------------------------------------------------------------- comparing


def test_groups_differ_only_in_what_is_not_seed_name_or_output(grid: Path) -> None:
    table = compare(collect_runs(grid), metrics=["balanced_accuracy"])
    by_label = {g.label: g for g in table.groups}
    assert set(by_label) == {A_LABEL, B_LABEL, C_LABEL}
    assert sorted(r.name for r in by_label[A_LABEL].runs) == ["a-s0", "a-s1", "a-s2", "a-s3"]
    assert by_label[C_LABEL].settings == {
        "plugins": [{"name": "focal", "params": {"gamma": 2.0}}],
        "train.lr": 0.1,
    }
    assert sorted(by_label[B_LABEL].seeds) == [0, 1, 2]


def test_means_std_and_intervals_by_hand(grid: Path) -> None:
    table = compare(collect_runs(grid), metrics=["balanced_accuracy"])
    for label, xs, t in (
        (A_LABEL, [0.50, 0.60, 0.70, 0.40], T6[3]),
        (B_LABEL, [0.55, 0.62, 0.80], T6[2]),
        (C_LABEL, [0.65, 0.66, 0.90], T6[2]),
    ):
        s = table.row(label, "balanced_accuracy").stat
        lo, hi = t_interval(xs, t)
        lo, hi = max(lo, 0.0), min(hi, 1.0)  # an accuracy's interval stays in [0, 1] (C's reaches 1.09)
        assert s.n == len(xs)
        assert s.mean == pytest.approx(mean(xs), abs=1e-12)
        assert s.std == pytest.approx(sample_std(xs), abs=1e-12)
        assert s.ci_low == pytest.approx(lo, abs=1e-6) and s.ci_high == pytest.approx(hi, abs=1e-6)
    # A by hand: mean 0.55, squared deviations 0.0025 + 0.0025 + 0.0225 + 0.0225 = 0.05.
    a = table.row(A_LABEL, "balanced_accuracy").stat
    assert a.mean == pytest.approx(0.55) and a.std == pytest.approx(math.sqrt(0.05 / 3))
    assert table.baseline is None and table.row(B_LABEL, "balanced_accuracy").diff is None


def test_paired_differences_pair_runs_by_seed(grid: Path) -> None:
    table = compare(collect_runs(grid), metrics=["balanced_accuracy"], baseline=A_LABEL)
    assert table.baseline == A_LABEL and table.groups[0].label == A_LABEL
    assert table.row(A_LABEL, "balanced_accuracy").diff is None
    # B - A on seeds 0, 1, 2: 0.55 - 0.50, 0.62 - 0.60, 0.80 - 0.70 (seed 3 has no partner).
    b = table.row(B_LABEL, "balanced_accuracy")
    d = [0.05, 0.02, 0.10]
    lo, hi = t_interval(d, T6[2])
    assert b.diff_seeds == (0, 1, 2) and b.diff is not None and b.diff.n == 3
    assert b.diff.mean == pytest.approx(mean(d), abs=1e-12)
    assert b.diff.std == pytest.approx(sample_std(d), abs=1e-12)
    assert (b.diff.ci_low, b.diff.ci_high) == (pytest.approx(lo, abs=1e-6), pytest.approx(hi, abs=1e-6))
    # C - A on seeds 1, 2 only (C's seed 7 has no baseline run): 0.05 and -0.04.
    c = table.row(C_LABEL, "balanced_accuracy")
    assert c.diff_seeds == (1, 2) and c.diff is not None
    assert c.diff.mean == pytest.approx(0.005, abs=1e-12)
    assert c.diff.std == pytest.approx(0.09 / math.sqrt(2), abs=1e-12)
    half = T6[1] * (0.09 / math.sqrt(2)) / math.sqrt(2)
    assert c.diff.ci_high == pytest.approx(0.005 + half, abs=1e-6)


def test_missing_values_shrink_n_and_are_noted(grid: Path) -> None:
    table = compare(collect_runs(grid), metrics=["tail_accuracy", "auroc_macro"], baseline=A_LABEL)
    a = table.row(A_LABEL, "tail_accuracy").stat
    assert a.n == 3 and a.mean == pytest.approx(0.15)  # seed 3 recorded None
    assert f"{A_LABEL}: 1 of 4 runs have no tail_accuracy." in table.notes
    assert table.row(B_LABEL, "auroc_macro").stat.n == 0
    assert table.row(B_LABEL, "auroc_macro").diff.n == 0


def test_default_metrics_are_those_present(grid: Path, tmp_path: Path) -> None:
    table = compare(collect_runs(grid))
    assert table.metrics == ["balanced_accuracy", "tail_accuracy"]
    cont = write_run(tmp_path / "cont", {"accuracy": 0.4, "a_auc": 0.3, "a_last": 0.35, "f_last": 0.1}, 0)
    assert compare(collect_runs(cont)).metrics == ["accuracy", "a_auc", "a_last", "f_last"]
    assert set(DEFAULT_METRICS) >= {
        "personalized_accuracy",
        "auroc_macro",
        "head_accuracy",
        "medium_accuracy",
    }


def test_baseline_lookup(grid: Path) -> None:
    runs = collect_runs(grid)
    assert compare(runs, baseline="train.lr=0.05").baseline == B_LABEL  # unique substring
    with pytest.raises(ValueError, match="matches several groups"):
        compare(runs, baseline="plugins=[]")
    with pytest.raises(ValueError, match=r"matches no group; the groups are: .*train\.lr=0\.05"):
        compare(runs, baseline="plugins=[ldam]")


def test_one_experiment_is_labelled_by_scenario_name(tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path / f"s{seed}", {"accuracy": 0.5 + seed / 10}, seed)
    table = compare(collect_runs(tmp_path))
    assert [g.label for g in table.groups] == ["hand"]
    assert table.row("hand", "accuracy").stat.mean == pytest.approx(0.55)


def test_runs_without_scenario_group_by_summary(tmp_path: Path) -> None:
    write_run(tmp_path / "x0", {"accuracy": 0.5}, 0, with_scenario=False)
    write_run(tmp_path / "x1", {"accuracy": 0.7}, 1, with_scenario=False)
    write_run(tmp_path / "f0", {"accuracy": 0.6}, 0, plugins=[{"name": "focal"}], with_scenario=False)
    table = compare(collect_runs(tmp_path), baseline="plugins=[]")
    assert [g.label for g in table.groups] == ["plugins=[]", "plugins=[focal]"]
    assert table.row("plugins=[focal]", "accuracy").diff.mean == pytest.approx(0.1)


def test_repeated_seed_is_averaged_for_pairing(grid: Path) -> None:
    write_run(grid / "b-s0-again", {"balanced_accuracy": 0.65, "tail_accuracy": 0.3}, 0, lr=0.05)
    table = compare(collect_runs(grid), metrics=["balanced_accuracy"], baseline=A_LABEL)
    b = table.row(B_LABEL, "balanced_accuracy")
    assert b.stat.n == 4
    # Seed 0 of B is (0.55 + 0.65) / 2 = 0.60: differences 0.10, 0.02, 0.10.
    assert b.diff.mean == pytest.approx(mean([0.10, 0.02, 0.10]))
    assert any("seeds [0] occur in several runs" in n for n in table.notes)


# --------------------------------------------------------------------------- output formats


@pytest.fixture
def table(grid: Path) -> ComparisonTable:
    return compare(collect_runs(grid), metrics=["balanced_accuracy", "tail_accuracy"], baseline=A_LABEL)


def test_csv_holds_every_number(table: ComparisonTable) -> None:
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert len(rows) == 6
    b = next(r for r in rows if r["group"] == B_LABEL and r["metric"] == "balanced_accuracy")
    xs, d = [0.55, 0.62, 0.80], [0.05, 0.02, 0.10]
    assert int(b["n"]) == 3 and float(b["mean"]) == pytest.approx(mean(xs))
    assert float(b["std"]) == pytest.approx(sample_std(xs))
    assert float(b["ci_low"]) == pytest.approx(t_interval(xs, T6[2])[0], abs=1e-6)
    assert int(b["diff_n"]) == 3 and float(b["diff_mean"]) == pytest.approx(mean(d))
    assert float(b["diff_ci_high"]) == pytest.approx(t_interval(d, T6[2])[1], abs=1e-6)
    a = next(r for r in rows if r["group"] == A_LABEL and r["metric"] == "balanced_accuracy")
    assert a["diff_n"] == "" and a["diff_mean"] == ""  # the baseline has no difference
    c = next(r for r in rows if r["group"] == C_LABEL and r["metric"] == "tail_accuracy")
    assert c["diff_n"] == "2" and float(c["diff_mean"]) == pytest.approx(0.3 - mean([0.20, 0.15]))


def test_json_round_trips(table: ComparisonTable) -> None:
    data = json.loads(table.to_json())
    assert data["baseline"] == A_LABEL and data["metrics"] == ["balanced_accuracy", "tail_accuracy"]
    assert data["groups"][0]["label"] == A_LABEL
    assert sorted(data["groups"][0]["seeds"]) == [0, 1, 2, 3]
    row = next(r for r in data["rows"] if r["group"] == C_LABEL and r["metric"] == "balanced_accuracy")
    assert row["values"] == [0.65, 0.66, 0.90]
    assert row["diff"]["seeds"] == [1, 2] and row["diff"]["values"] == pytest.approx([0.05, -0.04])


def test_markdown_reads_as_tables(table: ComparisonTable) -> None:
    md = table.to_markdown()
    xs, d = [0.55, 0.62, 0.80], [0.05, 0.02, 0.10]
    lo, hi = t_interval(xs, T6[2])
    dlo, dhi = t_interval(d, T6[2])
    expected = (
        f"| {B_LABEL} | 3 | {mean(xs):.4f} | {sample_std(xs):.4f} | [{lo:.4f}, {hi:.4f}] |"
        f" {mean(d):+.4f} | {sample_std(d):.4f} | [{dlo:+.4f}, {dhi:+.4f}] | 3 |"
    )
    assert expected in md.splitlines()
    by_eye = "| plugins=[], train.lr=0.05 | 3 | 0.6567 | 0.1290 | [0.3363, 0.9770] |"
    assert expected == by_eye + " +0.0567 | 0.0404 | [-0.0437, +0.1571] | 3 |"
    assert f"| {A_LABEL} (baseline) | 4 | 0, 1, 2, 3 |" in md
    assert "### balanced_accuracy" in md and "### tail_accuracy" in md
    assert f"- {A_LABEL}: 1 of 4 runs have no tail_accuracy." in md


# --------------------------------------------------------------------------- real runs


def test_real_runs_group_by_learning_rate(tmp_path: Path) -> None:
    from support.scenarios import TINY

    import fedlt

    finals: dict[tuple[float, int], dict[str, Any]] = {}
    for lr in (0.1, 0.05):
        for seed in (0, 1):
            s = copy.deepcopy(TINY)
            s["seed"], s["train"]["lr"], s["federation"]["rounds"] = seed, lr, 2
            finals[lr, seed] = fedlt.run(s, out=tmp_path / f"lr{lr}-s{seed}")["final"]
    table = compare(collect_runs(tmp_path), baseline="train.lr=0.1")
    assert [g.label for g in table.groups] == ["train.lr=0.1", "train.lr=0.05"]
    assert "accuracy" in table.metrics and "personalized_accuracy" in table.metrics
    for metric in ("accuracy", "balanced_accuracy"):
        base = [finals[0.1, s][metric] for s in (0, 1)]
        other = [finals[0.05, s][metric] for s in (0, 1)]
        assert table.row("train.lr=0.1", metric).stat.mean == pytest.approx(mean(base))
        assert table.row("train.lr=0.05", metric).stat.std == pytest.approx(sample_std(other))
        diff = table.row("train.lr=0.05", metric).diff
        assert diff.mean == pytest.approx(mean([o - b for o, b in zip(other, base, strict=True)]))


# --------------------------------------------------------------------------- what may split a group

OBSERVERS = (
    "mirror=support.observer_plugins:MirrorLogger,logging-remedy=support.observer_plugins:LoggingRemedy"
)


def test_settings_that_cannot_change_a_number_do_not_split(tmp_path: Path, monkeypatch) -> None:
    """Loggers (log.* keys, a logger-only plugin), checkpoints, threads, workers, devices: one group.
    A remedy (a plugin with any steering hook), another learning rate or bfloat16: their own group."""
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", OBSERVERS)
    neutral: list[dict[str, Any]] = [
        {},
        {"log": {"tensorboard": True, "wandb": True, "wandb_mode": "offline", "events": False}},
        {"checkpoint": {"every": 7}, "federation": {"eval_every": 2}},
        {"engine": {"threads": 3, "vectorize": "on", "group_size": 2, "device": "cuda"}},
        {"engine": {"kind": "ray", "num_workers": 4, "num_cpus": 2.0, "max_retries": 3}},
        {"eval": {"batch_size": 7, "time_to_accuracy": [0.5]}},
    ]
    for i, extra in enumerate(neutral):
        write_run(tmp_path / f"n{i}", {"accuracy": 0.5}, seed=i, scenario_extra=extra)
    write_run(tmp_path / "mirror", {"accuracy": 0.5}, seed=9, plugins=[{"name": "mirror"}])
    write_run(tmp_path / "lr", {"accuracy": 0.5}, seed=0, lr=0.5)
    write_run(tmp_path / "remedy", {"accuracy": 0.5}, seed=0, plugins=[{"name": "logging-remedy"}])
    write_run(tmp_path / "bf16", {"accuracy": 0.5}, seed=0, scenario_extra={"engine": {"dtype": "bfloat16"}})
    table = compare(collect_runs(tmp_path))
    by_run = {r.name: g.label for g in table.groups for r in g.runs}
    same = {by_run[f"n{i}"] for i in range(len(neutral))} | {by_run["mirror"]}
    assert len(same) == 1, by_run
    assert len(table.groups) == 4
    assert {by_run["lr"], by_run["remedy"], by_run["bf16"]}.isdisjoint(same)
    assert "train.lr=0.5" in by_run["lr"] and "plugins=[logging-remedy]" in by_run["remedy"]
    assert "engine.dtype=bfloat16" in by_run["bf16"]
    assert any("do not separate groups: mirror." in n for n in table.notes)


def test_only_lr_differs_gives_two_groups_whatever_the_loggers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", OBSERVERS)
    for seed in (0, 1):
        write_run(
            tmp_path / f"a{seed}", {"accuracy": 0.5}, seed, scenario_extra={"log": {"tensorboard": True}}
        )
        write_run(tmp_path / f"b{seed}", {"accuracy": 0.6}, seed, plugins=[{"name": "mirror"}])
        write_run(tmp_path / f"c{seed}", {"accuracy": 0.7}, seed, lr=0.01)
    table = compare(collect_runs(tmp_path), baseline="train.lr=0.1")
    assert [g.label for g in table.groups] == ["train.lr=0.1", "train.lr=0.01"]
    assert [r.name for r in table.groups[0].runs] == ["a0", "a1", "b0", "b1"]


def test_observer_rule_reads_hooks_not_names(monkeypatch) -> None:
    from fedlt.analysis.compare import OBSERVER_HOOKS, observer_plugins

    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", OBSERVERS)
    assert {"server_log_metrics", "server_end"} == OBSERVER_HOOKS
    # Not installed here: a remedy for all compare can tell, so it still separates groups.
    assert observer_plugins(["mirror", "logging-remedy", "focal", "no-such-plugin"]) == {"mirror"}


def test_a_logger_plugin_changes_no_number_in_a_real_run(tmp_path: Path, monkeypatch) -> None:
    """The claim behind the rule, checked on real runs: with and without the logger, equal finals."""
    from support.scenarios import TINY

    import fedlt

    monkeypatch.setenv("FEDLT_EXTRA_PLUGINS", OBSERVERS)
    s = copy.deepcopy(TINY)
    s["federation"]["rounds"] = 2
    plain = fedlt.run(s, out=tmp_path / "plain")
    logged = fedlt.run({**s, "plugins": [{"name": "mirror"}]}, out=tmp_path / "logged")
    assert logged["final"] == plain["final"]
    assert len((tmp_path / "logged" / "mirror.jsonl").read_text().splitlines()) == 2
    table = compare(collect_runs(tmp_path))
    assert len(table.groups) == 1 and table.row("tiny", "accuracy").stat.n == 2


# --------------------------------------------------------------------------- settings changed mid-run


def test_runs_resumed_with_other_settings_are_kept_apart_and_flagged(tmp_path: Path) -> None:
    """Final scenarios all say lr 0.5; two runs got there by `fedlt resume --set train.lr=0.5` at
    round 2: they form their own group, flagged, not averaged with runs at 0.5 throughout."""
    changed = {"round": 2, "overrides": {"train.lr": 0.5}, "command": "fedlt resume r --set train.lr=0.5"}
    neutral = {"round": 1, "overrides": {"engine.threads": 2, "log.tensorboard": True}, "command": "x"}
    for seed, acc in ((0, 0.60), (1, 0.70)):
        write_run(tmp_path / f"steady{seed}", {"accuracy": acc}, seed, lr=0.5)
        write_run(
            tmp_path / f"switched{seed}",
            {"accuracy": acc - 0.1},
            seed,
            lr=0.5,
            summary_extra={"resumes": [{**changed, "time": "2026-12-05T10:00:00Z"}]},
        )
    # Resumed, but only with settings that change no number (and once with no overrides at all).
    write_run(tmp_path / "steady2", {"accuracy": 0.65}, 2, lr=0.5, summary_extra={"resumes": [neutral]})
    write_run(tmp_path / "steady3", {"accuracy": 0.65}, 3, lr=0.5, summary_extra={"resumes": []})
    table = compare(collect_runs(tmp_path), metrics=["accuracy"], baseline="never")
    labels = [g.label for g in table.groups]
    assert labels == ["changed_mid_run=never", "changed_mid_run=[round 2: train.lr=0.5]"]
    steady, switched = table.groups
    assert sorted(r.name for r in steady.runs) == ["steady0", "steady1", "steady2", "steady3"]
    assert sorted(r.name for r in switched.runs) == ["switched0", "switched1"]
    assert switched.changes == [{"round": 2, "overrides": {"train.lr": 0.5}}] and steady.changes == []
    note = (
        "changed_mid_run=[round 2: train.lr=0.5]: settings changed mid-run (round 2: train.lr=0.5); "
        "kept apart from runs that ran with one setting throughout."
    )
    assert note in table.notes
    md = table.to_markdown()
    assert "| group | runs | seeds | settings changed mid-run |" in md
    assert "| changed_mid_run=[round 2: train.lr=0.5] | 2 | 0, 1 | round 2: train.lr=0.5 |" in md
    assert "| changed_mid_run=never (baseline) | 4 | 0, 1, 2, 3 | no |" in md
    assert json.loads(table.to_json())["groups"][1]["changed_mid_run"] == switched.changes
    # Paired by seed as any group: (0.5 - 0.6, 0.6 - 0.7).
    assert table.row(switched.label, "accuracy").diff.mean == pytest.approx(-0.1)


def test_runs_changed_the_same_way_group_together_and_others_apart(tmp_path: Path) -> None:
    one = [{"round": 3, "overrides": {"train.lr": 0.01}}]
    two = [{"round": 5, "overrides": {"train.lr": 0.01}}]
    write_run(tmp_path / "a0", {"accuracy": 0.5}, 0, lr=0.01, summary_extra={"resumes": one})
    write_run(tmp_path / "a1", {"accuracy": 0.5}, 1, lr=0.01, summary_extra={"resumes": one})
    write_run(tmp_path / "b0", {"accuracy": 0.5}, 0, lr=0.01, summary_extra={"resumes": two})
    labels = [g.label for g in compare(collect_runs(tmp_path)).groups]
    assert labels == ["changed_mid_run=[round 3: train.lr=0.01]", "changed_mid_run=[round 5: train.lr=0.01]"]


# --------------------------------------------------------------------------- intervals in range


def test_interval_of_an_accuracy_stays_in_its_range(tmp_path: Path) -> None:
    """Two seeds at 0.8667 and 0.9093: the t interval is [0.6174, 1.1586] (t(0.975, 1) = 12.706),
    what the issue reported; an accuracy cannot pass 1, so the interval is [0.6174, 1]."""
    from fedlt.analysis.compare import metric_bounds

    xs = [0.8667, 0.9093]
    lo, hi = t_interval(xs, T6[1])
    assert hi > 1.15 and 0.617 < lo < 0.618  # what compare printed before
    for seed, acc in enumerate(xs):
        write_run(tmp_path / f"s{seed}", {"accuracy": acc, "a_auc": acc, "f_last": -acc}, seed)
    table = compare(collect_runs(tmp_path), metrics=["accuracy", "a_auc", "f_last"])
    acc = table.row("hand", "accuracy").stat
    assert (acc.ci_low, acc.ci_high) == (pytest.approx(lo, abs=1e-6), 1.0)
    assert acc.clipped and acc.half_width == pytest.approx(hi - mean(xs), abs=1e-6)
    assert table.row("hand", "a_auc").stat.ci_high == 1.0
    f = table.row("hand", "f_last").stat  # forgetting lies in [-1, 1]
    assert (f.ci_low, f.ci_high) == (-1.0, pytest.approx(-lo, abs=1e-6))
    assert "hand: the 95% interval of accuracy is clipped to [0, 1]." in table.notes
    assert "[0.6174, 1.0000]" in table.to_markdown()
    assert metric_bounds("personalized_tail_accuracy") == (0, 1)
    assert metric_bounds("a_auc_personalized") == (0, 1) and metric_bounds("auroc_macro") == (0, 1)
    assert metric_bounds("diagnostics.nc1") is None and metric_bounds("train_loss") is None
    # shares of the noisy samples, and differences of two accuracies
    assert metric_bounds("noise_memorised") == (0, 1) and metric_bounds("auprc_macro") == (0, 1)
    assert metric_bounds("adv_detection_auroc") == (0, 1) and metric_bounds("ood_tail_auprc") == (0, 1)
    for signed in ("accuracy_disparity", "robust_accuracy_disparity", "fgsm_pgd_gap"):
        assert metric_bounds(signed) == (-1, 1)


def test_paired_difference_of_accuracies_stays_in_minus_one_one() -> None:
    from fedlt.analysis.compare import difference_bounds

    d = summarize([0.9, -0.2], difference_bounds((0.0, 1.0)))
    lo, hi = t_interval([0.9, -0.2], T6[1])
    assert lo < -1 and hi > 1
    assert (d.ci_low, d.ci_high) == (-1.0, 1.0)
    inside = summarize([0.5, 0.6, 0.55, 0.52], (0.0, 1.0))
    want = t_interval([0.5, 0.6, 0.55, 0.52], T6[3])
    assert not inside.clipped
    assert (inside.ci_low, inside.ci_high) == (
        pytest.approx(want[0], abs=1e-6),
        pytest.approx(want[1], abs=1e-6),
    )
    with pytest.raises(ValueError, match="low < high"):
        summarize([0.5], (1.0, 0.0))


# --------------------------------------------------------------------------- LaTeX


def test_latex_table_by_hand(grid: Path) -> None:
    table = compare(collect_runs(grid), metrics=["balanced_accuracy"], baseline=A_LABEL)
    tex = table.to_latex()
    lines = tex.splitlines()
    body = lines[lines.index("\\begin{tabular}{lrc}") :]
    a = [0.50, 0.60, 0.70, 0.40]
    alo, ahi = t_interval(a, T6[3])
    d = [0.05, 0.02, 0.10]
    dlo, dhi = t_interval(d, T6[2])
    assert body[:4] == [
        "\\begin{tabular}{lrc}",
        "\\toprule",
        "Group & $n$ & balanced\\_accuracy \\\\",
        "\\midrule",
    ]
    cell = f"${mean(a):.4f}$ {{\\scriptsize $[{alo:.4f}, {ahi:.4f}]$}}"
    assert body[4] == f"plugins=[], train.lr=0.1 (baseline) & 4 & {cell} \\\\"
    # By eye: mean 0.55, half-width 3.182446 * 0.129099 / 2 = 0.2054.
    assert (
        body[4] == "plugins=[], train.lr=0.1 (baseline) & 4 & $0.5500$ {\\scriptsize $[0.3446, 0.7554]$} \\\\"
    )
    # C's interval [0.3851, 1.0883] is clipped to 1.
    assert "plugins=[focal(gamma=2.0)], train.lr=0.1 & 3 & $0.7367$ {\\scriptsize $[0.3851, 1.0000]$}" in tex
    assert "\\multicolumn{3}{l}{\\emph{Paired difference to plugins=[], train.lr=0.1}} \\\\" in body
    assert (
        f"plugins=[], train.lr=0.05 & 3 & ${mean(d):+.4f}$ {{\\scriptsize $[{dlo:+.4f}, {dhi:+.4f}]$}} \\\\"
        in body
    )
    assert body[-1].startswith("%") and "\\bottomrule" in body and "\\end{tabular}" in body
    assert body.index("\\bottomrule") < body.index("\\end{tabular}")


def test_latex_escapes_labels_and_marks_missing_values(tmp_path: Path) -> None:
    from fedlt.analysis.compare import _tex

    assert _tex("a_b & 50% {x} #1 $ ~ ^ \\") == (
        "a\\_b \\& 50\\% \\{x\\} \\#1 \\$ \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
    )
    write_run(tmp_path / "one", {"accuracy": 0.5}, 0)
    tex = compare(collect_runs(tmp_path), metrics=["accuracy", "tail_accuracy"]).to_latex(digits=2)
    assert "hand & 1 & $0.50$ & -- \\\\" in tex.splitlines()


def test_cli_compare_writes_latex(grid: Path, tmp_path: Path, capsys) -> None:
    from fedlt.cli import main

    out = tmp_path / "table.tex"
    code = main(
        ["compare", str(grid), "--metrics", "balanced_accuracy", "--format", "latex", "--out", str(out)]
    )
    assert code == 0
    assert out.read_text() == compare(collect_runs(grid), metrics=["balanced_accuracy"]).to_latex()


def test_a_real_resume_with_new_settings_is_flagged(tmp_path: Path) -> None:
    """End to end: `fedlt.resume(..., train__lr=0.5)` records the change in summary.json, and the run
    is not grouped with one that ran at lr 0.5 for 3 rounds from the start (same final scenario)."""
    from support.scenarios import TINY

    import fedlt

    s = copy.deepcopy(TINY)
    s["federation"]["rounds"] = 2
    fedlt.run(s, out=tmp_path / "switched")
    fedlt.resume(tmp_path / "switched", federation__rounds=3, train__lr=0.5)
    s["federation"]["rounds"], s["train"]["lr"] = 3, 0.5
    fedlt.run(s, out=tmp_path / "steady")
    assert load_run(tmp_path / "switched").scenario == load_run(tmp_path / "steady").scenario
    table = compare(collect_runs(tmp_path))
    change = "round 2: federation.rounds=3, train.lr=0.5"
    assert [g.label for g in table.groups] == ["changed_mid_run=never", f"changed_mid_run=[{change}]"]
    assert [[r.name for r in g.runs] for g in table.groups] == [["steady"], ["switched"]]


def test_an_unset_plugin_parameter_is_the_same_as_a_missing_one() -> None:
    """scenario.toml cannot hold None, so a run's file omits unset parameters that a resolved
    scenario lists as None: both describe one experiment."""

    def run(name: str, **params: Any) -> RunRecord:
        plugins = [{"name": "focal", "params": params}]
        return RunRecord(Path(name), scenario={"seed": 0, "train": {"lr": 0.1}, "plugins": plugins})

    written, resolved, other = run("a", gamma=2.0), run("b", gamma=2.0, alpha=None), run("c", gamma=1.0)
    assert len(compare([written, resolved], metrics=[]).groups) == 1
    assert len(compare([written, resolved, other], metrics=[]).groups) == 2
