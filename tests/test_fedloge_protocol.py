"""scenarios/fedloge_cifar10_lt*.toml (the FedLoGe authors' protocol) and fedloge_matched.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import tomli_w
from support.scripts import load_script

SCRIPTS = Path(__file__).resolve().parents[1] / "scenarios"
FEDAVG = SCRIPTS / "fedloge_cifar10_lt.toml"
FEDLOGE = SCRIPTS / "fedloge_cifar10_lt_fedloge.toml"
HEADER = "setting,method,round,global,personalized,global_head,global_medium,global_tail"
SETTING = "cifar10-lt IF100 dir0.5 N40 frac0.2 resnet18"


def _load(name: str) -> ModuleType:
    return load_script(SCRIPTS / f"{name}.py")


# --------------------------------------------------------------------------- the scenario files


def test_fedavg_file_is_the_authors_protocol() -> None:
    s = tomllib.loads(FEDAVG.read_text())
    assert s["seed"] == 3407 and "plugins" not in s
    assert s["data"] == {
        "dataset": "imagefolder",
        "root": "../../shared/data/cifar10-jpeg.tar.gz",
        "augment": "crop-flip",
    }
    # The root is relative to the scenario file, as in cifar10_lt.toml: <repo>/../shared/data.
    assert s["data"]["root"] == tomllib.loads((SCRIPTS / "cifar10_lt.toml").read_text())["data"]["root"]
    # Compared as text (normpath), not resolved: ../shared may be a symlink on some machines.
    expected = os.path.normpath(SCRIPTS.parents[1] / "shared/data/cifar10-jpeg.tar.gz")
    assert os.path.normpath(SCRIPTS / s["data"]["root"]) == expected
    assert s["long_tail"] == {"profile": "exponential", "imbalance_factor": 100, "n_max": 5000}
    assert s["partition"] == {"kind": "dirichlet", "n_clients": 40, "alpha": 0.5}
    assert s["model"] == {"name": "resnet18"}
    assert s["train"] == {
        "local_epochs": 5,
        "batch_size": 8,
        "lr": 0.03,
        "momentum": 0.5,
        "weight_decay": 0.0,
    }
    assert s["federation"]["fraction_clients"] == 0.2 and s["federation"]["rounds"] == 500
    assert s["eval"]["shot_rule"] == "cumulative"


def test_fedloge_file_is_the_fedavg_file_plus_the_plugins() -> None:
    fedavg, fedloge = tomllib.loads(FEDAVG.read_text()), tomllib.loads(FEDLOGE.read_text())
    plugins = fedloge.pop("plugins")
    fedavg.pop("name"), fedloge.pop("name")
    assert fedloge == fedavg
    assert plugins == [
        {"name": "sse-c", "bias": "random"},
        {"name": "gla-fr", "global_head": "both", "personal_head": "local+aux", "mask": "test"},
    ]


@pytest.mark.parametrize("path", [FEDAVG, FEDLOGE])
def test_documented_one_line_set_gives_the_fedloge_file(path: Path) -> None:
    """Both files document the same `--set plugins=...`; applied to the FedAvg file it must give
    exactly the FedLoGe file's scenario."""
    from fedlt.scenario.config import load_scenario

    commands = [line for line in path.read_text().splitlines() if "--set 'plugins=" in line]
    assert commands, f"{path.name} documents no one-line --set"
    argv = shlex.split(commands[0].lstrip("# "))
    override = argv[argv.index("--set") + 1]
    from_set = load_scenario(FEDAVG, [override]).model_dump(mode="json")
    from_file = load_scenario(FEDLOGE).model_dump(mode="json")
    from_set.pop("name"), from_file.pop("name")
    assert from_set == from_file


# --------------------------------------------------------------------------- fedloge_matched.py


def _curves(tmp_path: Path) -> Path:
    rows = [HEADER]
    for r in range(12):  # the authors' rounds 0..11 = fedlt rounds 1..12
        rows.append(f"{SETTING},fedavg,{r},{0.10 + 0.01 * r:.4f},{0.50 + 0.01 * r:.4f},0.8,0.3,0.0{r % 10}")
        rows.append(f"{SETTING},fedloge,{r},{0.20 + 0.01 * r:.4f},{0.60 + 0.01 * r:.4f},0.7,0.2,0.01")
    rows.append("other setting,fedavg,4,0.99,0.99,0.99,0.99,0.99")
    path = tmp_path / "curves.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _run(tmp_path: Path, records: list[dict[str, Any]], plugins: list[dict[str, Any]] | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps(r) for r in records] + ['{"round": 99, "accur']  # a line cut by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"wall_seconds": 120.0, "rounds_run": 10, "provenance": {"device": "cpu", "threads": 1}}
    (run / "summary.json").write_text(json.dumps(summary))
    if plugins is not None:
        (run / "scenario.toml").write_text(
            tomli_w.dumps({"plugins": plugins, "federation": {"eval_every": 5}})
        )
    return run


def _cells(text: str, first: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {first} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_matched_table_fedavg(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")
    records = [
        {"round": 5, "accuracy": 0.20, "personalized_accuracy": 0.60, "head_accuracy": 0.9,
         "medium_accuracy": 0.25, "tail_accuracy": 0.0},
        {"round": 10, "accuracy": 0.25, "personalized_accuracy": 0.55, "head_accuracy": 0.85,
         "medium_accuracy": 0.30, "tail_accuracy": 0.05, "personalized_tail_accuracy": 0.5},
        {"round": 7, "train_loss": 1.0},  # not an evaluation with accuracy: ignored
    ]  # fmt: skip
    run = _run(tmp_path, records, plugins=[])
    out = tmp_path / "table.md"
    assert mod.main([str(run), "--curves", str(_curves(tmp_path)), "--out", str(out)]) == 0
    text = out.read_text()
    assert "### fedavg:" in text
    head = _cells(text, "round")
    assert head[:4] == ["round", "global: fedlt", "authors", "gap"]
    # fedlt round 5 is the authors' logged round 4: global 0.14, personalised 0.54.
    assert _cells(text, "5")[1:7] == ["20.0", "14.0", "+6.0", "60.0", "54.0", "+6.0"]
    row10 = _cells(text, "10")
    assert row10[1:7] == ["25.0", "19.0", "+6.0", "55.0", "59.0", "-4.0"]
    assert row10[13:16] == ["5.0", "9.0", "-4.0"]  # tail: the authors' round 9 logged 0.09
    # personalised tail: fedlt's value; these curves have no personalized_tail column
    assert head[22] == "personalised tail: fedlt" and row10[22:25] == ["50.0", "–", "–"]
    assert "| 20 |" not in text  # not evaluated by the run
    assert "Wall time per round: fedlt 12.0 s" in text and "190 s" in text


def test_matched_table_fedloge_reports_both_heads(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")
    record = {
        "round": 5,
        "accuracy": 0.30,  # the realigned head
        "personalized_accuracy": 0.70,
        "gla-fr.sse_c_accuracy": 0.25,
        "gla-fr.sse_c_head_accuracy": 0.75,
        "gla-fr.sse_c_medium_accuracy": 0.15,
        "gla-fr.sse_c_tail_accuracy": 0.0,
        "head_accuracy": 0.5,
    }
    run = _run(tmp_path, [record], plugins=[{"name": "sse-c"}, {"name": "gla-fr"}])
    lines = mod.report(mod.read_run(run), _curves(tmp_path), SETTING, None, [5])
    text = "\n".join(lines)
    assert "### fedloge:" in text
    head = _cells(text, "round")
    assert head[1] == "global, SSE-C head: fedlt" and head[4] == "global, realigned head: fedlt"
    cells = _cells(text, "5")
    # SSE-C global against the authors' (their round 4: 0.24), then personalised (0.64).
    assert cells[1:4] == ["25.0", "24.0", "+1.0"] and cells[4] == "30.0"
    assert cells[5:8] == ["70.0", "64.0", "+6.0"]
    assert cells[8:11] == ["75.0", "70.0", "+5.0"]  # head from the SSE-C head, not head_accuracy


def test_matched_method_must_be_fedavg_or_fedloge(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")
    run = _run(tmp_path, [{"round": 5, "accuracy": 0.1}], plugins=[{"name": "focal"}])
    with pytest.raises(SystemExit, match="--method"):
        mod.main([str(run), "--curves", str(_curves(tmp_path))])
    assert re.search(
        r"\| 5 \| 10\.0 \| 14\.0 \| -4\.0",
        "\n".join(mod.report(mod.read_run(run), _curves(tmp_path), SETTING, "fedavg", None)),
    )


def test_departures_ignore_plugin_defaults_a_run_spells_out(tmp_path: Path) -> None:
    """A run's scenario.toml writes every plugin parameter; the protocol file names only some.
    Only real departures may be reported (a run at 30 rounds departs in that alone)."""
    from fedlt.hooks.dispatch import build_hooks_spelled_out
    from fedlt.scenario.config import load_scenario, scenario_to_toml

    mod = _load("fedloge_matched")
    resolved = load_scenario(FEDLOGE, ["federation.rounds=30"])
    build_hooks_spelled_out(resolved.plugins)  # what the runner does before writing scenario.toml
    assert "n_refit_steps" in resolved.plugins[0].params  # a default the file does not name
    run = tmp_path / "run"
    run.mkdir()
    (run / "scenario.toml").write_text(scenario_to_toml(resolved))
    (run / "metrics.jsonl").write_text("")
    assert mod.protocol_departures(mod.read_run(run), "fedloge") == ["federation.rounds=30"]


# --------------------------------------------------------------------------- personalised masks


def _named_run(tmp_path: Path, name: str, records, plugins) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    run = _run(folder, records, plugins)
    return run


def test_each_run_states_its_personalised_mask(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")
    recorded = {
        "round": 5,
        "accuracy": 0.2,
        "personalized_accuracy": 0.7,
        "personalized_mask": "test-classes",
        "personalized_mask_source": "eval.personalized_mask",
    }
    fedavg = _named_run(tmp_path, "masked", [recorded], [])
    text = "\n".join(mod.report(mod.read_run(fedavg), _curves(tmp_path), SETTING, None, [5]))
    assert "### fedavg: " in text and "(personalised mask: test-classes, eval.personalized_mask)" in text
    # The authors' FedAvg is unmasked (localtest_villina): the note says the masks differ.
    assert "the authors' fedavg `none` (`localtest_villina`). The masks differ" in text
    # A FedLoGe run made before the mask was recorded: gla-fr's own mask, marked inferred.
    old = _named_run(tmp_path, "old", [{"round": 5, "accuracy": 0.2}],
                     [{"name": "sse-c"}, {"name": "gla-fr", "mask": "test"}])  # fmt: skip
    inferred = ("test-classes", "gla-fr, inferred (not recorded by the run)")
    assert mod.personal_mask(mod.read_run(old)) == inferred
    plugins = [{"name": "sse-c"}, {"name": "gla-fr"}]
    default = _named_run(tmp_path, "default", [{"round": 5, "accuracy": 0.2}], plugins)
    assert mod.personal_mask(mod.read_run(default))[0] == "train-classes"
    plain = _named_run(tmp_path, "plain", [{"round": 5, "accuracy": 0.2}], [])
    assert mod.personal_mask(mod.read_run(plain))[0] == "none"


def test_fedavg_with_fedloges_mask_is_reported_beside_fedloge(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")

    def record(acc: float, mask: str) -> dict[str, Any]:
        return {"round": 5, "accuracy": 0.2, "personalized_accuracy": acc, "personalized_mask": mask}

    none = _named_run(tmp_path, "fedavg-none", [record(0.644, "none")], [])
    masked = _named_run(tmp_path, "fedavg-test", [record(0.731, "test-classes")], [])
    fedloge = _named_run(tmp_path, "fedloge", [record(0.733, "test-classes")],
                         [{"name": "sse-c"}, {"name": "gla-fr"}])  # fmt: skip
    curves = _curves(tmp_path)
    out = tmp_path / "t.md"
    runs = [str(none), str(masked), str(fedloge)]
    mod.main([*runs, "--curves", str(curves), "--rounds", "5", "--out", str(out)])
    text = out.read_text()
    table = text[text.index("### Personalised accuracy by mask") :]
    head = _cells(table, "round")
    assert head[1:4] == [
        "fedavg (mask none): `fedavg-none/run`",
        "fedavg (mask test-classes): `fedavg-test/run`",
        "fedloge (mask test-classes): `fedloge/run`",
    ]
    assert head[4] == "fedloge - fedavg, both mask test-classes"
    # Like for like: 73.3 - 73.1 = +0.2 (not 73.3 - 64.4).
    assert _cells(table, "5")[1:] == ["64.4", "73.1", "73.3", "+0.2"]
    assert "No FedAvg run with FedLoGe's mask" not in text
    # Without the masked FedAvg run the table says what is missing.
    out2 = tmp_path / "t2.md"
    mod.main([str(none), str(fedloge), "--curves", str(curves), "--rounds", "5", "--out", str(out2)])
    assert "No FedAvg run with FedLoGe's mask `test-classes` was given" in out2.read_text()
    assert "eval.personalized_mask=test-classes" in out2.read_text()


# --------------------------------------------------------------------------- CIFAR-100 and several seeds

FEDAVG100 = SCRIPTS / "fedloge_cifar100_lt.toml"
FEDLOGE100 = SCRIPTS / "fedloge_cifar100_lt_fedloge.toml"


def test_cifar100_files_are_the_authors_cifar100_protocol() -> None:
    """The authors' CIFAR-100-LT logs (curves.csv: 'cifar100-lt IF100 dir0.5 N20 frac0.2 resnet34'):
    the CIFAR-10 protocol with CIFAR-100 (n_max 500), 20 clients and ResNet-34."""
    c10, c100 = tomllib.loads(FEDAVG.read_text()), tomllib.loads(FEDAVG100.read_text())
    assert c100["data"]["root"] == "../../shared/data/cifar100-jpeg.tar.gz"
    assert c100["long_tail"] == {"profile": "exponential", "imbalance_factor": 100, "n_max": 500}
    assert c100["partition"] == {"kind": "dirichlet", "n_clients": 20, "alpha": 0.5}
    assert c100["model"] == {"name": "resnet34"}
    for key in ("name", "data", "long_tail", "partition", "model"):
        c10.pop(key), c100.pop(key)
    assert c100 == c10  # seed, training, federation and evaluation as on CIFAR-10
    fedavg, fedloge = tomllib.loads(FEDAVG100.read_text()), tomllib.loads(FEDLOGE100.read_text())
    plugins = fedloge.pop("plugins")
    fedavg.pop("name"), fedloge.pop("name")
    assert fedloge == fedavg
    assert plugins == tomllib.loads(FEDLOGE.read_text())["plugins"]
    # The exponential profile at n_max 500, IF 100: the 10,847 images of the authors' logs.
    counts = [int(500 * (1 / 100) ** (i / 99)) for i in range(100)]
    assert sum(counts) == 10847


def _seed_run(
    tmp_path: Path, name: str, seed: int, rows: dict[int, dict[str, float]], plugins, root: str
) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r, **v}) + "\n" for r, v in rows.items()))
    summary = {"seed": seed, "wall_seconds": 100.0, "rounds_run": 10}
    (run / "summary.json").write_text(json.dumps(summary))
    scenario = {"seed": seed, "data": {"dataset": "imagefolder", "root": root}, "plugins": plugins}
    (run / "scenario.toml").write_text(tomli_w.dumps(scenario))
    return run


def test_runs_are_matched_with_their_datasets_curves_and_seeds_are_aggregated(tmp_path: Path) -> None:
    mod = _load("fedloge_matched")
    s100 = "cifar100-lt IF100 dir0.5 N20 frac0.2 resnet34"
    curves = tmp_path / "curves.csv"
    curves.write_text(
        HEADER + "\n"
        f"{SETTING},fedavg,4,0.90,0.90,0.9,0.9,0.9\n"  # must not be used for CIFAR-100 runs
        f"{s100},fedavg,4,0.10,0.40,0.3,0.1,0.0\n"
        f"{s100},fedloge,4,0.12,0.50,0.3,0.1,0.0\n"
    )
    root = "../../shared/data/cifar100-jpeg.tar.gz"
    fedavg_acc, fedloge_acc = [0.10, 0.12, 0.17], [0.13, 0.16, 0.19]  # seeds 1, 2, 3
    runs = []
    for seed, a, b in zip((1, 2, 3), fedavg_acc, fedloge_acc, strict=True):
        runs.append(
            _seed_run(
                tmp_path, f"avg{seed}", seed, {5: {"accuracy": a, "personalized_accuracy": 0.4}}, [], root
            )
        )
        rec = {"accuracy": 0.05, "gla-fr.sse_c_accuracy": b, "personalized_accuracy": 0.5,
               "personalized_mask": "none"}  # fmt: skip
        runs.append(
            _seed_run(tmp_path, f"loge{seed}", seed, {5: rec}, [{"name": "sse-c"}, {"name": "gla-fr"}], root)
        )
    assert mod.run_setting(mod.read_run(runs[0])) == s100
    out = tmp_path / "t.md"
    assert (
        mod.main([*map(str, runs), "--curves", str(curves), "--seeds", "--rounds", "5", "--out", str(out)])
        == 0
    )
    text = out.read_text()
    assert f"### fedavg, personalised mask none ({s100}): 3 runs, seeds 1, 2, 3" in text
    # Mean 0.13, sample std 0.036056, t(0.975, 2) = 4.302653: half-width 0.089566 -> [4.0, 22.0] %.
    section = text[text.index("### fedavg") : text.index("### fedloge")]
    cells = _cells(section, "5")
    assert cells[1:4] == ["13.0 [4.0, 22.0]", "10.0", "+3.0"]
    # FedLoGe - FedAvg, paired by seed: 3, 4, 2 points -> mean 3.0, std 1.0, half-width 2.48.
    paired = text[text.index("### FedLoGe - FedAvg") :]
    assert _cells(paired, "5")[1] == "+3.0 [+0.5, +5.5]"
    assert _cells(paired, "5")[2] == "+10.0 [+10.0, +10.0]"  # 0.5 - 0.4 in every seed: std 0
