"""Scenario loading, overrides, and the bad-input messages."""

from __future__ import annotations

import pytest

from fedlt.config import apply_overrides, load_scenario, scenario_from_dict, scenario_to_toml
from fedlt.errors import ScenarioError


def test_quickstart_loads_with_documented_defaults():
    s = load_scenario("quickstart")
    assert s.name == "quickstart"
    assert s.data.dataset == "digits"
    assert s.long_tail.imbalance_factor == 10
    assert s.partition.alpha == 0.5 and s.partition.n_clients == 10


def test_overrides_parse_toml_literals_and_index_plugins():
    raw = {"plugins": [{"name": "focal"}]}
    out = apply_overrides(
        raw,
        [
            "plugins.0.gamma=1.5",
            "federation.rounds=3",
            "data.root=some/dir",
            "eval.shot_thresholds=[50, 10]",
            "eval.personalized=false",
        ],
    )
    assert out == {
        "plugins": [{"name": "focal", "gamma": 1.5}],
        "federation": {"rounds": 3},
        "data": {"root": "some/dir"},
        "eval": {"shot_thresholds": [50, 10], "personalized": False},
    }
    assert raw == {"plugins": [{"name": "focal"}]}, "the input must not be mutated"


def test_python_overrides_use_double_underscore():
    s = load_scenario("quickstart", {"federation__rounds": 2, "partition.alpha": 0.1})
    assert s.federation.rounds == 2 and s.partition.alpha == 0.1


def test_resolved_toml_round_trips(tiny):
    tiny["plugins"] = [{"name": "focal", "gamma": 1.0}]
    s = scenario_from_dict(tiny)
    again = load_scenario_text(scenario_to_toml(s))
    assert again == s


def load_scenario_text(text: str):
    import tomllib

    return scenario_from_dict(tomllib.loads(text))


def test_relative_root_resolves_against_scenario_file(tmp_path):
    (tmp_path / "s.toml").write_text('[data]\ndataset = "imagefolder"\nroot = "imgs"\n')
    s = load_scenario(tmp_path / "s.toml")
    assert s.data.root == str((tmp_path / "imgs").resolve())


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"partition": {"alpha": 0}}, "partition.alpha", "greater than 0"),
        ({"partition": {"alpha": -1.0}}, "partition.alpha", "Got -1.0"),
        (
            {"long_tail": {"imbalance_factor": 0.5}},
            "long_tail.imbalance_factor",
            "greater than or equal to 1",
        ),
        ({"federation": {"fraction_clients": 0}}, "federation.fraction_clients", "greater than 0"),
        ({"federation": {"fraction_clients": 1.5}}, "federation.fraction_clients", "less than or equal to 1"),
        ({"federation": {"rounds": "ten"}}, "federation.rounds", "'ten'"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset", "'digits'"),
        ({"model": {"name": "vgg"}}, "model.name", "'mlp'"),
        ({"engine": {"device": "tpu"}}, "engine.device", "'cpu'"),
        ({"model": {"name": "cnn", "hidden": [8]}}, "model.hidden", "takes: widths"),
    ],
)
def test_bad_values_name_key_value_and_allowed(raw, key, fragment):
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(raw)
    assert info.value.key == key
    assert f"The {key!r} value must be" in str(info.value)
    assert fragment in str(info.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ScenarioError, match=r"Unknown key 'partition.alpah'.*alpha, kind, min_client_size"):
        scenario_from_dict({"partition": {"alpah": 0.5}})


def test_unknown_top_level_section():
    with pytest.raises(ScenarioError, match=r"Unknown key 'trian'"):
        scenario_from_dict({"trian": {"lr": 0.1}})


def test_all_errors_reported_in_one_paragraph():
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"partition": {"alpha": -1}, "federation": {"rounds": 0}})
    text = str(info.value)
    assert "partition.alpha" in text and "federation.rounds" in text and "\n" not in text


def test_malformed_override_and_bad_index():
    with pytest.raises(ScenarioError, match=r"key\.sub=value"):
        apply_overrides({}, ["federation.rounds"])
    with pytest.raises(ScenarioError, match="an index from 0 to 1"):
        apply_overrides({"plugins": [{"name": "focal"}]}, ["plugins.3.gamma=1"])
    added = apply_overrides({}, ["plugins.0.name=focal", "plugins.1.name=balanced-softmax"])
    assert added == {"plugins": [{"name": "focal"}, {"name": "balanced-softmax"}]}


def test_duplicate_plugin_rejected():
    with pytest.raises(ScenarioError, match=r"plugins\[1\].name"):
        scenario_from_dict({"plugins": [{"name": "focal"}, {"name": "focal"}]})


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ScenarioError, match=r"existing \.toml file"):
        load_scenario(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("name = [")
    with pytest.raises(ScenarioError, match="valid TOML"):
        load_scenario(tmp_path / "bad.toml")
