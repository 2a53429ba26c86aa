"""Scenario loading, overrides, and the bad-input messages."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlt.data.datasets import DATASETS
from fedlt.data.longtail import PROFILES
from fedlt.data.partition import PARTITIONS
from fedlt.data.stream import STREAM_KINDS
from fedlt.errors import ScenarioError
from fedlt.models import MODELS
from fedlt.scenario.config import (
    DataConfig,
    LongTailConfig,
    ModelConfig,
    PartitionConfig,
    Scenario,
    StreamConfig,
    apply_overrides,
    load_scenario,
    scenario_from_dict,
    scenario_to_toml,
)


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
            {"long_tail": {"profile": "exponential", "imbalance_factor": 0.5}},
            "long_tail.imbalance_factor",
            "a number >= 1",
        ),
        (
            {"long_tail": {"imbalance_factor": 10}},
            "long_tail.imbalance_factor",
            "unset for long-tail profile",
        ),
        ({"federation": {"fraction_clients": 0}}, "federation.fraction_clients", "greater than 0"),
        ({"federation": {"fraction_clients": 1.5}}, "federation.fraction_clients", "a number <= 1"),
        ({"eval": {"shot_thresholds": [20]}}, "eval.shot_thresholds", "a list of at least 2 items"),
        ({"federation": {"rounds": "ten"}}, "federation.rounds", "'ten'"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset", "'digits'"),
        ({"model": {"name": "vgg"}}, "model.name", "'mlp'"),
        ({"engine": {"device": "tpu"}}, "engine.device", "'cpu'"),
        ({"model": {"name": "cnn", "hidden": [8]}}, "model.hidden", "takes: widths"),
        ({"train": {"lr": float("inf")}}, "train.lr", "a finite number"),
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


# --------------------------------------------------------------------------- registry sections


@pytest.mark.parametrize(
    ("section", "selector", "registry"),
    [
        (DataConfig, "dataset", DATASETS),
        (LongTailConfig, "profile", PROFILES),
        (PartitionConfig, "kind", PARTITIONS),
        (ModelConfig, "name", MODELS),
    ],
)
def test_sections_are_derived_from_their_registry(section, selector, registry) -> None:
    # The selector allows exactly the registry's names; every entry parameter is a key of the section.
    assert section.model_fields[selector].annotation.__args__ == registry.names
    params = {key for entry in registry.entries() for key in entry.takes}
    assert params <= set(section.model_fields)
    for entry in registry.entries():
        table = section.model_validate({selector: entry.name, **_required(entry)})
        assert set(table.params()) == set(entry.takes)


def _required(entry) -> dict:
    return {k: "some/dir" for k, f in entry.params.model_fields.items() if f.is_required()}


def test_stream_kinds_come_from_the_stream_module() -> None:
    assert StreamConfig.model_fields["kind"].annotation.__args__ == ("none", *STREAM_KINDS)


def test_the_error_for_a_parameter_the_choice_does_not_take() -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"model": {"name": "resnet18", "hidden": [64]}})
    assert str(info.value) == (
        "The 'model.hidden' value must be unset for model 'resnet18'. Got [64] instead. "
        "'resnet18' takes: width."
    )


def test_resolved_scenario_spells_out_the_chosen_entrys_defaults() -> None:
    s = scenario_from_dict({"model": {"name": "resnet18"}, "partition": {"kind": "shards"}})
    assert s.model.params() == {"width": 64} and s.model.width == 64
    assert s.partition.params() == {"shards_per_client": 2}
    assert s.data.params() == {"test_fraction": 0.3}  # digits, the default dataset
    written = tomllib.loads(scenario_to_toml(s))
    assert written["model"] == {"name": "resnet18", "width": 64}
    assert written["partition"] == {"kind": "shards", "n_clients": 10, "shards_per_client": 2}
    assert written["data"] == {"dataset": "digits", "augment": "none", "test_fraction": 0.3}
    assert written["long_tail"] == {"profile": "none"}
    assert scenario_from_dict(written) == s


def test_required_parameter_of_the_chosen_entry() -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"data": {"dataset": "cifar10"}})
    assert info.value.key == "data.root"
    assert "must be set" in str(info.value)
    s = scenario_from_dict({"data": {"dataset": "imagefolder", "root": "/x"}})
    assert s.data.params()["max_image_bytes"] == 64 * 2**20


def test_all_stray_parameters_are_named_in_one_message() -> None:
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"partition": {"kind": "iid", "alpha": 0.1, "shards_per_client": 3}})
    text = str(info.value)
    assert "'partition.alpha'" in text and "'partition.shards_per_client'" in text
    assert "'iid' takes: no parameters." in text


def test_switching_the_choice_with_set_drops_the_old_choices_parameters() -> None:
    # quickstart sets model.hidden for its mlp; a cnn takes widths instead.
    s = load_scenario("quickstart", ["model.name=cnn"])
    assert s.model.params() == {"widths": [16, 32]}
    s = load_scenario("quickstart", ["partition.kind=iid"])  # quickstart sets partition.alpha
    assert s.partition.params() == {} and s.partition.alpha is None
    # A parameter set by an override is kept, so a wrong one is still reported.
    with pytest.raises(ScenarioError, match=r"'model.hidden' value must be unset for model 'cnn'"):
        load_scenario("quickstart", ["model.name=cnn", "model.hidden=[8]"])
    # The same selector value drops nothing.
    assert load_scenario("quickstart", ["model.name=mlp"]).model.hidden == [128, 64]


def test_assignment_revalidates_the_section() -> None:
    s = scenario_from_dict({})
    s.data.test_fraction = 0.5
    assert s.data.params() == {"test_fraction": 0.5}
    with pytest.raises(ValueError, match=r"'data\.n_train' value must be unset for dataset 'digits'"):
        s.data.n_train = 10


@pytest.mark.parametrize("override", ["seed.x=1", "name.x=1", "data.root.x=1", "federation.rounds.x=2"])
def test_set_into_a_single_value_is_a_clear_error(override: str) -> None:
    key, _, _ = override.partition("=")
    with pytest.raises(ScenarioError, match=r"Cannot set .*holds a single value.*not a table") as info:
        load_scenario("quickstart", [override])
    assert info.value.key == key


def test_non_utf8_file_names_the_byte(tmp_path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))  # 0xe9 is not UTF-8 on its own
    with pytest.raises(ScenarioError, match=r"UTF-8 encoded TOML file.*Byte 11 \(line 1\)") as info:
        load_scenario(path)
    assert info.value.key == "scenario"


def test_relative_paths_from_overrides_resolve_against_the_file(tmp_path) -> None:
    (tmp_path / "s.toml").write_text('[model]\nname = "vit"\n')
    s = load_scenario(tmp_path / "s.toml", ["model.pretrained=w.pt"])
    assert s.model.pretrained == str((tmp_path / "w.pt").resolve())


def test_every_section_default_is_valid() -> None:
    s = Scenario()
    assert s.model.params() == {"hidden": [128, 64]}
    assert s.stream.schedule == "per-client"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.toml")), ids=str
)
def test_every_shipped_scenario_loads_and_passes_preflight(path: Path) -> None:
    """Each scenarios/*.toml is a valid scenario whose plugins, keys and traces check out (its data
    is not loaded: some read ../shared/data)."""
    from fedlt.prepare import preflight

    scenario = load_scenario(path)
    assert preflight(scenario) == []
