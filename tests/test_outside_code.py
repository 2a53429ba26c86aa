"""Models and datasets from outside packages (entry-point groups ``fedlt.models`` / ``fedlt.datasets``),
and ``fedlt config``.

The outside package is a real one: a module and a ``.dist-info`` folder with ``entry_points.txt``,
written to a temporary folder and put on ``sys.path``, found by ``importlib.metadata`` as an
installed package would be.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

import fedlt
from fedlt.base.registry import OutsideEntryError
from fedlt.cli import main
from fedlt.data.datasets import DATASETS, load_dataset
from fedlt.errors import ScenarioError
from fedlt.models import MODELS, build_model
from fedlt.prepare import build_data, prepare
from fedlt.scenario.config import load_scenario, scenario_from_dict, scenario_to_toml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
import docgen  # documentation tooling lives in docs/, outside the runtime package

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-outside"  # the worked example of docs/extending.md
PACKAGE = "fedlt_example_parts"
DIST = "fedlt-example-parts"

#: Entry points a second, test-only package declares: each unusable in its own way.
BAD_MODULE = """
from torch import nn

from fedlt.base.registry import Entry
from fedlt_example_parts import DATASET, TinyNet, TinyNetParams

NOT_AN_ENTRY = 3
MISNAMED = Entry("other", TinyNetParams, "Named unlike its entry point.", TinyNet)
LINEAR = Entry("linear", TinyNetParams, "Builds no FedModel.", lambda shape, n, width, gain: nn.Linear(4, n))
BLOBS_AGAIN = DATASET
"""
BAD_DIST = "fedlt-outside-testing"
BAD_ENTRY_POINTS = """
[fedlt.models]
broken = fedlt_outside_testing_missing:MODEL
notentry = fedlt_outside_testing:NOT_AN_ENTRY
misnamed = fedlt_outside_testing:MISNAMED
linear = fedlt_outside_testing:LINEAR
cnn = fedlt_example_parts:MODEL
"""


def _dist_info(site: Path, dist: str, entry_points: str) -> None:
    """What `pip install` leaves for importlib.metadata: METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def _example_entry_points() -> str:
    """The example's pyproject.toml entry points, as entry_points.txt spells them."""
    groups = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    return "".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n"
        for group, eps in groups.items()
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the example package and the test-only one, as if pip had installed them."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(EXAMPLE / PACKAGE, root / PACKAGE)
    _dist_info(root, DIST, _example_entry_points())
    (root / "fedlt_outside_testing.py").write_text(BAD_MODULE)
    _dist_info(root, BAD_DIST, BAD_ENTRY_POINTS)
    return root


@pytest.fixture
def installed(site, monkeypatch) -> Path:
    """The outside packages importable and their entry points visible, for this test only."""
    monkeypatch.syspath_prepend(str(site))
    return site


def _scenario(**sections) -> dict:
    base = {
        "name": "outside",
        "seed": 0,
        "data": {"dataset": "blobs", "n_per_class": 30},
        "model": {"name": "tinynet", "width": 6},
        "partition": {"kind": "iid", "n_clients": 3},
        "train": {"batch_size": 16},
        "federation": {"rounds": 2, "fraction_clients": 1.0, "eval_every": 1},
    }
    for key, value in sections.items():
        base[key] = {**base[key], **value}
    return base


# --------------------------------------------------------------------------- running one


def test_the_worked_example_runs_end_to_end(installed, tmp_path) -> None:
    summary = fedlt.run(EXAMPLE / "scenario.toml", out=tmp_path / "run", federation__rounds=2)
    assert summary["rounds"] == 2
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    # The run folder's scenario spells out the outside entries' parameters, defaults included.
    written = tomllib.loads((tmp_path / "run" / "scenario.toml").read_text())
    assert written["model"] == {"name": "tinynet", "width": 16, "gain": 1.0}
    assert written["data"] == {
        "dataset": "blobs",
        "augment": "none",
        "n_per_class": 60,
        "num_classes": 4,
        "spread": 0.5,
    }
    # The data is the outside dataset's, 60 samples of each of its 4 classes, long-tailed by the
    # scenario's profile: n_i = floor(60 * 10 ** (-i / 3)).
    scenario = load_scenario(EXAMPLE / "scenario.toml")
    counts = build_data(scenario).train_class_counts.tolist()
    assert counts == [math.floor(60 * 10 ** (-i / 3)) for i in range(4)]
    # The model is the package's network: 4 inputs -> 16 tanh units -> 4 classes.
    model = build_model("tinynet", (4,), 4, width=16)
    assert type(model).__module__ == PACKAGE
    assert sum(p.numel() for p in model.parameters()) == (4 * 16 + 16) + (16 * 4 + 4)


def test_the_guide_quotes_the_example_verbatim() -> None:
    guide = (ROOT / "docs" / "extending.md").read_text()
    for path in (EXAMPLE / "pyproject.toml", EXAMPLE / PACKAGE / "__init__.py", EXAMPLE / "scenario.toml"):
        assert path.read_text() in guide, f"docs/extending.md must quote {path.relative_to(ROOT)} verbatim"
    readme = (ROOT / "README.md").read_text()
    assert "(docs/extending.md)" in readme


def test_outside_entries_resolve_like_built_in_ones(installed) -> None:
    s = scenario_from_dict(_scenario())
    assert s.model.name == "tinynet" and s.model.params() == {"width": 6, "gain": 1.0}
    assert s.data.params() == {"n_per_class": 30, "num_classes": 3, "spread": 0.5}
    # A parameter name a built-in entry also has (resnet's int width, synthetic's num_classes)
    # holds the outside value; one no built-in has is an attribute of the section.
    assert s.model.width == 6 and s.model.gain == 1.0 and s.model.hidden is None
    assert scenario_from_dict(tomllib.loads(scenario_to_toml(s))) == s
    assert load_scenario("quickstart", ["model.name=tinynet"]).model.params() == {"width": 8, "gain": 1.0}
    raw = load_dataset("blobs", seed=1, n_per_class=5)
    assert raw.train.x.shape == (15, 4) and raw.num_classes == 3


def test_switching_to_and_from_an_outside_entry_drops_the_old_parameters(installed) -> None:
    # As for built-in entries, a --set that switches the choice drops what the new one does not take:
    # tinynet's width (a key built-in entries have too) and gain (one they do not).
    written = _scenario(model={"gain": 2.0})
    assert load_scenario(written, ["model.name=mlp"]).model.params() == {"hidden": [128, 64]}
    s = load_scenario("quickstart", ["model.name=tinynet", "model.gain=2.0"])
    assert s.model.params() == {"width": 8, "gain": 2.0}


def test_an_outside_section_survives_pickling_and_refuses_assignment(installed) -> None:
    s = scenario_from_dict(_scenario())
    assert pickle.loads(pickle.dumps(s)) == s  # what a Ray worker receives
    assert pickle.loads(pickle.dumps(s)).model.gain == 1.0
    with pytest.raises(
        ValueError, match=r"'model\.name' value must be a built-in model for a section changed"
    ):
        s.model.width = 3


def test_a_built_in_name_always_means_the_built_in_entry(installed) -> None:
    # The package also registers "cnn": the scenario's cnn stays fedlt's, the clash is reported.
    assert MODELS["cnn"] is MODELS.entries()[MODELS.names.index("cnn")]
    assert "built-in model" in MODELS.outside()["cnn"].error
    assert scenario_from_dict({"model": {"name": "cnn"}}).model.params() == {"widths": [16, 32]}
    assert MODELS.names[:2] == ("mlp", "cnn") and "tinynet" not in MODELS.names
    assert "tinynet" in MODELS.known() and "cnn" in MODELS.known()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("model", {"width": 0}, "The 'model.width' value must be a number >= 1. Got 0 instead."),
        ("model", {"width": "8"}, "The 'model.width' value must be an integer. Got '8' instead."),
        (
            "model",
            {"gain": -1.0},
            "The 'model.gain' value must be a number greater than 0. Got -1.0 instead.",
        ),
        (
            "model",
            {"hidden": [4]},
            "The 'model.hidden' value must be unset for model 'tinynet'. Got [4] instead. "
            "'tinynet' takes: width, gain.",
        ),
        (
            "model",
            {"layers": 2},
            "Unknown key 'model.layers' (value 2). Keys allowed in model: gain, name, width.",
        ),
        ("data", {"spread": 0}, "The 'data.spread' value must be a number greater than 0. Got 0 instead."),
        ("data", {"n_per_class": 2.5}, "The 'data.n_per_class' value must be an integer. Got 2.5 instead."),
        (
            "data",
            {"root": "/x"},
            "The 'data.root' value must be unset for dataset 'blobs'. Got '/x' instead. "
            "'blobs' takes: n_per_class, num_classes, spread.",
        ),
    ],
)
def test_bad_parameters_of_outside_entries_name_the_key(installed, section, values, message) -> None:
    # Worded exactly as for a built-in entry (tests/test_config.py pins those words).
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(_scenario(**{section: values}))
    assert str(info.value) == message
    assert info.value.key == f"{section}.{next(iter(values))}"


def test_an_unknown_key_is_worded_as_for_built_in_entries(installed) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"model": {"name": "mlp", "layers": 2}})
    assert str(info.value).startswith("Unknown key 'model.layers' (value 2). Keys allowed in model: depth, ")


def test_validate_names_the_outside_entries(installed, capsys) -> None:
    assert main(["validate", str(EXAMPLE / "scenario.toml")]) == 0
    assert capsys.readouterr().out.endswith(
        "valid (4 clients, 105 training samples, 4 classes, plugins: none, "
        f"data blobs from {DIST}, model tinynet from {DIST})\n"
    )
    assert scenario_from_dict({}).model.origin() is None


def test_cli_exits_2_on_a_bad_outside_parameter(installed, capsys) -> None:
    assert main(["validate", "quickstart", "--set", "model.name=tinynet", "--set", "model.width=0"]) == 2
    assert "model.width" in capsys.readouterr().err


def test_an_unknown_name_lists_the_outside_ones(installed) -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"model": {"name": "tinyne"}})
    assert info.value.key == "model.name"
    assert "'mlp'" in str(info.value) and "'tinynet'" in str(info.value)


@pytest.mark.parametrize(
    ("name", "target", "reason"),
    [
        (
            "broken",
            "fedlt_outside_testing_missing:MODEL",
            "importing it failed: ModuleNotFoundError: No module named 'fedlt_outside_testing_missing'",
        ),
        (
            "notentry",
            "fedlt_outside_testing:NOT_AN_ENTRY",
            "it points at an object of type int, not a fedlt.base.registry.Entry",
        ),
        ("misnamed", "fedlt_outside_testing:MISNAMED", "it points at an Entry named 'other'"),
    ],
)
def test_a_broken_entry_point_fails_only_where_used_and_names_itself(installed, name, target, reason) -> None:
    # Scenarios that do not use it are unaffected (the others here run with it installed).
    scenario_from_dict(_scenario())
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(_scenario(model={"name": name, "width": None}))
    assert info.value.key == "model.name"
    assert str(info.value) == (
        f"The 'model.name' value must be a model that can be used. Got {name!r} instead. The model "
        f"{name!r} from package {BAD_DIST} (entry point fedlt.models: {name} = {target}) cannot be used: "
        f"{reason}" + ("; the entry point's name must be the Entry's name." if name == "misnamed" else ".")
    )
    with pytest.raises(OutsideEntryError) as raw:
        MODELS[name]
    assert raw.value.reason.startswith(reason) and raw.value.origin.startswith(f"package {BAD_DIST}")
    assert main(["validate", "quickstart", "--set", f"model.name={name}"]) == 2


def test_an_outside_builder_must_return_a_fedmodel(installed) -> None:
    scenario = scenario_from_dict(_scenario(model={"name": "linear"}))
    with pytest.raises(ScenarioError) as info:
        prepare(scenario, "cpu")
    assert info.value.key == "model.name"
    assert "returned a Linear" in str(info.value) and BAD_DIST in str(info.value)


def test_two_packages_claiming_a_name_name_each_other(installed, tmp_path, monkeypatch) -> None:
    other = tmp_path / "other-site"
    other.mkdir()
    _dist_info(other, "fedlt-other-blobs", "[fedlt.datasets]\nblobs = fedlt_outside_testing:BLOBS_AGAIN\n")
    monkeypatch.syspath_prepend(str(other))
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(_scenario())
    message = str(info.value)
    assert info.value.key == "data.dataset"
    assert "fedlt-other-blobs" in message and DIST in message and "registers the same name" in message


def test_without_the_package_its_names_are_unknown(site) -> None:
    assert str(site) not in sys.path
    assert "tinynet" not in MODELS and "blobs" not in DATASETS
    with pytest.raises(ScenarioError, match=r"model\.name"):
        scenario_from_dict({"model": {"name": "tinynet"}})


# --------------------------------------------------------------------------- docs


def test_docgen_lists_outside_entries_like_built_in_ones(installed) -> None:
    text = docgen.outside_reference()
    assert '### `name = "tinynet"`' in text and '### `dataset = "blobs"`' in text
    assert "| `gain` | `float` | `1.0` | > 0 | Scale of the initial hidden weights. |" in text
    assert f"{DIST}" in text and "unusable" in text and "broken" in text
    # The committed reference never depends on what is installed.
    assert "tinynet" not in docgen.scenario_reference()


# --------------------------------------------------------------------------- fedlt config


def test_config_prints_the_resolved_scenario(capsys) -> None:
    assert main(["config", "quickstart", "--set", "federation.rounds=3"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    resolved = load_scenario("quickstart", ["federation.rounds=3"])
    assert scenario_from_dict(printed) == resolved
    assert printed["federation"]["rounds"] == 3
    # Keys the file does not set are spelled out with their documented defaults (docs/scenarios.md).
    assert printed["train"]["optimizer"] == "sgd" and printed["train"]["weight_decay"] == 0.0
    assert printed["data"]["test_fraction"] == 0.3 and printed["engine"]["kind"] == "serial"


def test_config_json(capsys) -> None:
    assert main(["config", "quickstart", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert scenario_from_dict(printed) == load_scenario("quickstart")
    assert printed["model"] == {"name": "mlp", "hidden": [128, 64]}


def test_config_spells_out_an_outside_entry(installed, capsys) -> None:
    assert main(["config", "quickstart", "--set", "model.name=tinynet"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["model"] == {"name": "tinynet", "width": 8, "gain": 1.0}


def test_config_refuses_bad_input_with_status_2(capsys, tmp_path) -> None:
    assert main(["config", "quickstart", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["config", str(tmp_path / "missing.toml")]) == 2
    assert not list(tmp_path.iterdir())  # nothing built, nothing written


def test_config_does_not_build_data(capsys, tmp_path) -> None:
    # A dataset folder that does not exist: validate refuses it (it loads data), config does not.
    args = ["--set", "data.dataset=cifar10", "--set", f"data.root={tmp_path / 'nothing'}"]
    assert main(["config", "quickstart", *args]) == 0
    assert tomllib.loads(capsys.readouterr().out)["data"]["root"] == str(tmp_path / "nothing")
    assert main(["validate", "quickstart", *args]) == 2
