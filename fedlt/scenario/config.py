"""Scenario files: TOML validated into typed models when loaded.

A scenario is validated once, at the boundary (load time), and every later step trusts it. Bad
input becomes a :class:`~fedlt.errors.ScenarioError` naming the dotted key, the value given and
what is allowed; the CLI prints it and exits 2 before any work starts. Every rule that the
scenario alone decides is checked here; what only the data can tell (a missing folder, a broken
archive, too many clients for the samples) is checked by
:func:`fedlt.data.federated.build_federated_data`, the one other boundary.

The ``[data]``, ``[long_tail]``, ``[partition]`` and ``[model]`` sections are derived from the
registries (:data:`fedlt.data.datasets.DATASETS`, :data:`fedlt.data.longtail.PROFILES`,
:data:`fedlt.data.partition.PARTITIONS`, :data:`fedlt.models.MODELS`) by one factory,
:func:`registry_section`: the selector's allowed values are the registry's names, the other keys
are the union of the entries' parameters, and only the chosen entry's parameters may be set.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictFloat,
    StrictInt,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from fedlt.base.registry import Entry, OutsideEntryError, ParameterError, Registry
from fedlt.data.datasets import DATASETS
from fedlt.data.longtail import PROFILES
from fedlt.data.noise import CLASS_MAPS, NOISE_KINDS
from fedlt.data.ood import OOD_KINDS
from fedlt.data.partition import PARTITIONS
from fedlt.data.stream import PACINGS, SCHEDULES, STREAM_KINDS
from fedlt.errors import ScenarioError, readable_constraint
from fedlt.metrics.classification import SHOT_RULES, shot_thresholds
from fedlt.models import MODELS

#: ``eval.attack.kind``: "none" turns robustness evaluation off (the attacks: fedlt.evaluation.attacks).
ATTACK_KINDS = ("none", "fgsm", "pgd")
#: ``eval.attack.norm``: the perturbation budget's norm.
ATTACK_NORMS = ("linf", "l2")

__all__ = [
    "AttackConfig",
    "CheckpointConfig",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "FederationConfig",
    "LogConfig",
    "LongTailConfig",
    "ModelConfig",
    "NoiseConfig",
    "PartitionConfig",
    "PluginSpec",
    "RegistrySection",
    "Scenario",
    "StreamConfig",
    "SystemConfig",
    "TrainConfig",
    "apply_overrides",
    "builtin_scenario_path",
    "load_scenario",
    "parse_value",
    "registry_section",
    "scenario_from_dict",
    "scenario_to_toml",
]

#: Keys holding paths, resolved against the scenario file's folder when relative.
PATH_KEYS: tuple[tuple[str, str], ...] = (("data", "root"), ("data", "cache_dir"), ("model", "pretrained"))


class _Section(BaseModel):
    # No scenario key means infinity or NaN; refusing them here keeps them out of every float.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _combine(errors: list[ScenarioError]) -> ScenarioError:
    """One error whose message holds every message, so a user fixes them all in one go."""
    first = errors[0]
    if len(errors) > 1:
        first.args = (" ".join(str(e) for e in errors),)
    return first


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


class RegistrySection(_Section):
    """Base of the sections :func:`registry_section` derives from a registry.

    An entry an outside package registers (docs/extending.md) is validated like a built-in one:
    its parameters by its own model, errors keyed ``section.param``. Its parameters are stored
    whatever their names (a key no built-in entry takes is an extra attribute), so the resolved
    ``scenario.toml`` spells them out too.
    """

    # Extra keys hold only an outside entry's own parameters: _chosen_entry refuses every other.
    model_config = ConfigDict(extra="allow")

    __registry__: ClassVar[Registry]
    __selector__: ClassVar[str]
    __section__: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _chosen_entry(cls, data: Any) -> Any:
        """Only the chosen entry's parameters may be set; check them and fill in its defaults.

        Runs on every table and on every assignment to a field (``validate_assignment``); a table
        choosing an outside entry reaches it already checked (:meth:`_outside_entry`).
        """
        if not isinstance(data, Mapping):
            return data  # field validation says "a table"
        name = data.get(cls.__selector__, cls.model_fields[cls.__selector__].default)
        if name in cls.__registry__ and not cls.__registry__.is_builtin(name):
            raise ScenarioError(
                f"{cls.__section__}.{cls.__selector__}",
                name,
                f"a built-in {cls.__registry__.kind} for a section changed by assignment",
                hint="Build a new scenario with the new values instead (scenario_from_dict, --set).",
            )
        entry, checked, rest = _checked_table(cls, data)
        return data if entry is None else {**rest, **checked}

    @model_validator(mode="wrap")
    @classmethod
    def _outside_entry(cls, data: Any, handler: Any) -> Any:
        """A table choosing an outside entry: checked like any other, its values stored as checked.

        The fields are typed for the built-in entries, so the table is validated with the default
        entry chosen and no parameters, then the name and the outside entry's parameters (checked
        by its own model) are put in place: fields it shares with built-in entries hold its values
        (None where it does not take them), the rest are extra attributes.
        """
        registry, selector = cls.__registry__, cls.__selector__
        name = data.get(selector) if isinstance(data, Mapping) else None
        if name not in registry or registry.is_builtin(name):
            return handler(data)
        _, checked, rest = _checked_table(cls, data)
        validated = handler({**rest, selector: cls.model_fields[selector].default})
        for key in registry.parameters():
            validated.__dict__[key] = checked.pop(key, None)
        validated.__pydantic_extra__.update(checked)
        validated.__dict__[selector] = name
        return validated

    def entry(self) -> Entry:
        """The registry entry the selector names."""
        return self.__registry__[getattr(self, self.__selector__)]

    def params(self) -> dict[str, Any]:
        """The chosen entry's parameters, validated and with its defaults filled in."""
        return {k: getattr(self, k) for k in self.entry().takes}

    def origin(self) -> str | None:
        """The package the chosen entry comes from; None for a built-in one."""
        name = getattr(self, self.__selector__)
        return None if self.__registry__.is_builtin(name) else self.__registry__.outside()[name].distribution


def _checked_table(
    cls: type[RegistrySection], data: Mapping[str, Any]
) -> tuple[Entry | None, dict[str, Any], dict[str, Any]]:
    """The chosen entry (None for an unknown name), its parameters checked with its defaults filled
    in, and the table's other keys; a :class:`ScenarioError` for a key the entry does not take."""
    registry, selector = cls.__registry__, cls.__selector__
    name = data.get(selector, cls.model_fields[selector].default)
    entry = _chosen(cls, name)
    takes = entry.takes if entry is not None else ()
    if unknown := [k for k in data if k not in cls.model_fields and k not in takes]:
        raise _combine([_unknown_key(cls, k, data[k], entry) for k in unknown])
    if entry is None:
        return None, {}, dict(data)
    union = registry.parameters()
    given = {k: v for k, v in data.items() if (k in union or k in takes) and v is not None}
    section, kind = cls.__section__, registry.kind
    stray = [
        ScenarioError(
            f"{section}.{k}",
            v,
            f"unset for {kind} {name!r}",
            hint=f"{name!r} takes: {', '.join(entry.takes) or 'no parameters'}.",
        )
        for k, v in given.items()
        if k not in entry.takes
    ]
    if stray:
        raise _combine(stray)
    try:
        checked = dict(entry.params.model_validate(given))
    except ValidationError as exc:
        raise _params_error(section, kind, entry, exc) from None
    return entry, checked, {k: v for k, v in data.items() if k not in union and k not in takes}


def _chosen(cls: type[RegistrySection], name: Any) -> Entry | None:
    """The entry the selector names; None for an unknown name (the field's validation says which
    names are allowed, or this does when installed packages add some)."""
    registry, selector = cls.__registry__, cls.__selector__
    key = f"{cls.__section__}.{selector}"
    if name not in registry:
        if isinstance(name, str) and len(registry.known()) > len(registry.names):
            allowed = ", ".join(repr(n) for n in registry.known())
            raise ScenarioError(key, name, f"one of {allowed}")
        return None
    try:
        entry = registry[name]
    except OutsideEntryError as exc:
        raise ScenarioError(key, name, f"a {registry.kind} that can be used", hint=f"{exc}.") from None
    if clash := [k for k in entry.takes if k in cls.model_fields and k not in registry.parameters()]:
        raise ScenarioError(
            key,
            name,
            f"a {registry.kind} whose parameters are not keys of [{cls.__section__}] itself",
            hint=f"Its parameter {clash[0]!r} is one; rename it in {registry.outside()[name].origin}.",
        )
    return entry


def _unknown_key(cls: type[RegistrySection], key: str, value: Any, entry: Entry | None) -> ScenarioError:
    """The error for a key neither the section nor the chosen entry has, worded as for any section."""
    if entry is None or cls.__registry__.is_builtin(entry.name):
        keys = sorted(cls.model_fields)
    else:
        union = cls.__registry__.parameters()
        keys = sorted({*(k for k in cls.model_fields if k not in union), *entry.takes})
    dotted, allowed = f"{cls.__section__}.{key}", ", ".join(keys)
    error = ScenarioError(dotted, value, f"a known key; [{cls.__section__}] takes: {allowed}")
    error.args = (f"Unknown key {dotted!r} (value {value!r}). Keys allowed in {cls.__section__}: {allowed}.",)
    return error


def _params_error(section: str, kind: str, entry: Entry, exc: ValidationError) -> ScenarioError:
    """An entry's parameter errors as scenario errors keyed ``section.field``."""
    errors = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ParameterError):
            errors.append(ScenarioError(f"{section}.{cause.param}", cause.value, cause.allowed, cause.hint))
        elif err["type"] == "missing":
            field = entry.params.model_fields.get(str(err["loc"][0]))
            hint = field.description if field is not None else None
            errors.append(
                ScenarioError(_dotted((section, *err["loc"])), None, f"set for {kind} {entry.name!r}", hint)
            )
        else:
            errors.append(
                ScenarioError(_dotted((section, *err["loc"])), err.get("input"), readable_constraint(err))
            )
    return _combine(errors)


def _describe(key: str, entries: list[Entry]) -> str:
    """A union key's description: each distinct entry description, prefixed by who takes it."""
    by_text: dict[str, list[str]] = {}
    for entry in entries:
        text = entry.params.model_fields[key].description or ""
        by_text.setdefault(text, []).append(entry.name)
    return " ".join(f"{', '.join(names)}: {text}" for text, names in by_text.items())


def _as_held(value: Any) -> Any:
    return value


def registry_section(
    name: str,
    doc: str,
    registry: Registry,
    selector: str,
    default: str,
    selector_doc: str,
    shared: Mapping[str, tuple[Any, FieldInfo]] | None = None,
) -> type[RegistrySection]:
    """A scenario section derived from ``registry``: written once, used for every such section.

    Parameters
    ----------
    name : str
        The section's key in the scenario (``"model"``); errors are keyed ``name.field``.
    doc : str
        The section's docstring (the scenario reference's summary).
    registry : Registry
        Where the selector's values and every parameter come from.
    selector : str
        The key choosing the entry (``"name"``, ``"dataset"``, ``"kind"``, ``"profile"``).
    default : str
        The entry chosen when the selector is unset.
    selector_doc : str
        The selector's description.
    shared : mapping, optional
        Keys every entry has, as ``{key: (annotation, Field(...))}`` (``partition.n_clients``).

    Returns
    -------
    type[RegistrySection]
        Its fields: the selector (``Literal`` of the registry's names), the shared keys, then every
        parameter any entry takes, each optional (default None, description from the entries).
        Validation rejects parameters the chosen entry does not take, checks the rest with the
        entry's parameter model and fills in the entry's defaults, so ``params()`` and the resolved
        ``scenario.toml`` spell out every parameter of the chosen entry.
    """
    fields: dict[str, Any] = {
        selector: (Literal[registry.names], Field(default, description=selector_doc)),  # type: ignore[valid-type]
        **dict(shared or {}),
    }
    for key, entries in registry.parameters().items():
        annotation = entries[0].params.model_fields[key].annotation
        # Written as held: an outside entry's parameter of the same name may have another type.
        held = Annotated[annotation | None, PlainSerializer(_as_held)]
        fields[key] = (held, Field(None, description=_describe(key, entries)))
    model_name = "".join(part.title() for part in name.split("_")) + "Config"
    cls = create_model(model_name, __base__=RegistrySection, __doc__=doc, __module__=__name__, **fields)
    cls.__registry__ = registry
    cls.__selector__ = selector
    cls.__section__ = name
    return cls


DataConfig = registry_section(
    "data",
    "Which dataset, from where, and how samples are prepared.",
    DATASETS,
    "dataset",
    "digits",
    "Dataset from the registry (each one's keys below).",
    shared={
        "augment": (
            Literal["none", "crop-flip"],
            Field(
                "none",
                description="Training-time augmentation of image batches (random 4-pixel-padded crop and "
                "flip).",
            ),
        )
    },
)

LongTailConfig = registry_section(
    "long_tail",
    "The long-tailed profile applied to the training set before it is split across clients.",
    PROFILES,
    "profile",
    "none",
    "The profile from the registry (each one's keys below); none keeps every sample.",
)

PartitionConfig = registry_section(
    "partition",
    "How the (long-tailed) training set is split across clients.",
    PARTITIONS,
    "kind",
    "dirichlet",
    "The partitioner from the registry (each one's keys below).",
    shared={"n_clients": (int, Field(10, ge=1, description="Number of clients."))},
)

ModelConfig = registry_section(
    "model",
    "The network; every model has a `features(x)` / `head` split.",
    MODELS,
    "name",
    "mlp",
    "Model from the registry (each one's keys below).",
)

_STREAM_KINDS = ("none", *STREAM_KINDS)


class StreamConfig(_Section):
    """Continual learning: each client's data arrives as a stream of tasks (Si-Blurry)."""

    kind: Literal[_STREAM_KINDS] = Field(  # type: ignore[valid-type]
        "none",
        description="none: offline federated learning; si-blurry: stochastic blurry task boundaries per "
        "client (Moon et al. 2023); i-blurry: the non-stochastic variant (equal splits).",
    )
    schedule: Literal[SCHEDULES] = Field(  # type: ignore[valid-type]
        "per-client",
        description="per-client: each client draws its own class-to-task assignment from its classes; "
        "shared: one assignment for the whole federation (federated class-incremental learning).",
    )
    n_tasks: int = Field(
        5,
        ge=1,
        description="Tasks T per client stream (at most the smallest non-empty client's sample count).",
    )
    disjoint_percent: float = Field(
        50.0,
        ge=0,
        le=100,
        description="N: share of a client's classes that are disjoint (appear in one task).",
    )
    blurry_percent: float = Field(
        10.0, ge=0, le=100, description="M: share of blurry-class samples that leak into other tasks."
    )
    samples_per_round: int = Field(
        64, ge=1, description="Stream samples a selected client consumes per round."
    )
    online_iter: int = Field(1, ge=1, description="Gradient steps on each incoming batch.")
    eval_period: int | Literal["auto"] = Field(
        "auto",
        description="P: an A_auc point at every multiple of P stream samples read by the federation "
        "(CLIB/MVP's eval period, counted over all clients), none skipped; auto: ceil(total stream "
        "samples / 50), 50 points over the whole stream as MVP's 1,000 of CIFAR-100's 50,000.",
    )
    pacing: Literal[PACINGS] = Field(  # type: ignore[valid-type]
        "constant",
        description="constant: every selected client reads samples_per_round a round; proportional: task t "
        "lasts ceil(largest client's task t / samples_per_round) rounds and each client reads its task t "
        "evenly over them, so every client ends each task in the same round (synchronous modes).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the data each client reads (dataset split, long-tail subsample, partition, "
        "local test views, task schedule, streams); unset: the scenario's seed. Training draws keep "
        "the scenario's.",
    )

    @field_validator("eval_period")
    @classmethod
    def _period(cls, value: int | str) -> int | str:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError('an int >= 1 (stream samples read by the federation) or "auto"')
        return value

    @model_validator(mode="after")
    def _kind_keys(self) -> StreamConfig:
        """Stream keys without a stream would be ignored: refused (:func:`_refuse_inapplicable`)."""
        _refuse_inapplicable(self, "stream", *_KIND_KEYS["stream"])
        return self


class NoiseConfig(_Section):
    """Label noise on each client's training labels (docs/noise.md); test labels stay clean."""

    kind: Literal[NOISE_KINDS] = Field(  # type: ignore[valid-type]
        "none",
        description="none: clean labels; symmetric: each label flipped with probability rate to one of "
        "the other classes, uniformly; pair: flipped to class (c + 1) mod C; class-dependent: class c "
        "flipped with probability rates[c], uniformly; tail: class c flipped with probability "
        "rate * N / (C * n_c) (n_c its training count, N their sum), so every class carries the same "
        "number of noisy labels and the tail the highest rates; the overall share is rate; asymmetric: "
        "each class of map flipped with probability rate to its target (Patrini et al.), other classes "
        "clean.",
    )
    rate: float = Field(
        0.0, ge=0, le=1, description="symmetric, pair, tail: the share of training labels flipped."
    )
    rates: list[float] | None = Field(None, description="class-dependent: one flip rate in [0, 1] per class.")
    map: str | dict[str, int] | None = Field(
        None,
        description="asymmetric: {source class = target class}, e.g. {9 = 1, 2 = 0}, or 'cifar10' (truck -> "
        "automobile, bird -> airplane, deer -> horse, cat <-> dog; Patrini et al. 2017). Class ids as the "
        "data numbers them (after held-out OOD classes are removed).",
    )
    seed: int | None = Field(
        None,
        ge=0,
        description="Seed of the flips (client k draws from (seed, 'noise', k)); unset: the seed of "
        "the data (stream.seed if set, else the scenario's).",
    )

    @field_validator("rates")
    @classmethod
    def _rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or not all(0 <= r <= 1 for r in value)):
            raise ValueError("a non-empty list of rates in [0, 1], one per class")
        return value

    @field_validator("map", mode="before")
    @classmethod
    def _map(cls, value: Any) -> Any:
        """Class ids as TOML writes table keys (strings), whichever way they were given."""
        if isinstance(value, str) and value not in CLASS_MAPS:
            raise ValueError(f"a table {{source class = target class}} or one of {sorted(CLASS_MAPS)}")
        if not isinstance(value, Mapping):
            return value
        if not value:
            raise ValueError("a non-empty table {source class = target class}, or 'cifar10'")
        out: dict[str, int] = {}
        for source, target in value.items():
            ok = str(source).isdigit() and isinstance(target, int) and not isinstance(target, bool)
            if not ok or target < 0 or int(source) == target:
                raise ValueError(
                    f"class ids >= 0 and a target other than its source; {source} = {target!r} is not"
                )
            out[str(int(source))] = target
        return out

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> NoiseConfig:
        if self.kind == "asymmetric" and self.map is None:
            raise ScenarioError(
                "noise.map", None, "a table {source class = target class} or 'cifar10' with kind 'asymmetric'"
            )
        if self.kind != "asymmetric" and self.map is not None:
            raise ScenarioError(
                "noise.map", self.map, f"unset with kind {self.kind!r} (only 'asymmetric' uses a map)"
            )
        if self.kind == "class-dependent":
            if self.rates is None:
                raise ScenarioError("noise.rates", None, "per-class rates with kind 'class-dependent'")
            if self.rate:
                raise ScenarioError("noise.rate", self.rate, "unset with kind 'class-dependent' (use rates)")
        elif self.rates is not None:
            raise ScenarioError("noise.rates", self.rates, f"unset with kind {self.kind!r}")
        if self.kind in ("symmetric", "pair", "tail", "asymmetric") and self.rate == 0:
            raise ScenarioError("noise.rate", self.rate, f"in (0, 1] with kind {self.kind!r}")
        if self.kind == "none" and (self.rate or self.seed is not None):
            key, value = ("noise.rate", self.rate) if self.rate else ("noise.seed", self.seed)
            raise ScenarioError(key, value, "unset with kind 'none' (no noise)")
        return self


class TrainConfig(_Section):
    """Local training on each selected client."""

    local_epochs: int = Field(1, ge=1, description="Passes over the client's data per round.")
    local_steps: int | None = Field(
        None, ge=1, description="If set, exactly this many batches per round instead."
    )
    batch_size: int = Field(32, ge=1, description="Local batch size.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Local optimizer, fresh each round.")
    lr: float = Field(0.05, gt=0, description="Learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")


#: ``federation.mode``: how server updates happen (docs/async.md).
FEDERATION_MODES = ("sync", "deadline", "async", "buffered")

#: Keys that belong to some modes only, with their defaults (a value other than the default in
#: another mode is refused: it would be ignored).
_MODE_KEYS: dict[str, tuple[tuple[str, ...], Any]] = {
    "deadline": (("deadline",), None),
    "over_selection": (("deadline",), 1.0),
    "concurrency": (("async", "buffered"), None),
    "async_alpha": (("async",), 0.6),
    "buffer_size": (("buffered",), 10),
    "server_lr": (("buffered",), 1.0),
    "staleness": (("async", "buffered"), "polynomial"),
    "staleness_a": (("async", "buffered"), 0.5),
    "staleness_b": (("async", "buffered"), 4.0),
}


def _refuse_inapplicable(
    config: BaseModel, section: str, selector: str, kinds: dict[str, tuple[str, ...]]
) -> None:
    """One rule for every section with a kind: a key that the chosen kind does not use must keep its
    default (unset), or it is refused naming it: a value that would be silently ignored is a mistake.

    ``kinds`` maps each such key to the kinds that use it; the defaults are the fields'.
    """
    chosen = getattr(config, selector)
    for key, users in kinds.items():
        value, default = getattr(config, key), type(config).model_fields[key].default
        if chosen not in users and value != default:
            raise ScenarioError(
                f"{section}.{key}",
                value,
                f"unset with {section}.{selector} = {chosen!r}",
                hint=f"It applies to {section}.{selector} {' or '.join(repr(k) for k in users)}.",
            )


#: Per section with a kind: the selector and the keys only some kinds use (see
#: :func:`_refuse_inapplicable`; an override switching the kind drops the others' keys).
_KIND_KEYS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "federation": ("mode", {k: modes for k, (modes, _) in _MODE_KEYS.items()}),
    "stream": (
        "kind",
        {
            k: STREAM_KINDS
            for k in (
                "schedule",
                "n_tasks",
                "disjoint_percent",
                "blurry_percent",
                "samples_per_round",
                "online_iter",
                "eval_period",
                "pacing",
                "seed",
            )
        },
    ),
    "engine": (
        "kind",
        {
            "vectorize": ("serial",),
            "group_size": ("serial",),
            **{k: ("ray", "flower") for k in ("num_workers", "num_cpus", "num_gpus", "address")},
            "max_retries": ("ray", "flower"),
        },
    ),
}


class FederationConfig(_Section):
    """Rounds (server updates), participation, how the server updates, evaluation cadence."""

    mode: Literal["sync", "deadline", "async", "buffered"] = Field(
        "sync",
        description="sync: rounds that wait for every selected client; deadline: rounds that keep the "
        "first arrivals before a virtual deadline (Bonawitz et al. 2019); async: FedAsync, the server mixes "
        "each update in as it arrives (Xie et al. 2019); buffered: FedBuff, the server applies every "
        "buffer_size arrivals (Nguyen et al. 2022). See docs/async.md.",
    )
    rounds: int = Field(
        10, ge=1, description="Server updates (communication rounds in sync and deadline modes)."
    )
    fraction_clients: float = Field(1.0, gt=0, le=1, description="Share of clients selected each round.")
    eval_every: int = Field(1, ge=0, description="Evaluate every this many rounds (0: only after the last).")
    deadline: float | None = Field(
        None, gt=0, description="deadline: virtual seconds a round waits for updates (required there)."
    )
    over_selection: float = Field(
        1.0,
        ge=1,
        description="deadline: select ceil(over_selection * k) clients and keep the first k updates that "
        "arrive before the deadline (1.3 in Bonawitz et al.).",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="async, buffered: clients training at once (unset: max(1, floor(n_clients * "
        "fraction_clients))); at most partition.n_clients.",
    )
    async_alpha: float = Field(
        0.6,
        gt=0,
        le=1,
        description="async: mixing weight alpha, x = (1 - alpha s(staleness)) x + alpha s x_new.",
    )
    buffer_size: int = Field(10, ge=1, description="buffered: arrivals per server update (FedBuff's K).")
    server_lr: float = Field(1.0, gt=0, description="buffered: server learning rate eta_g on the mean delta.")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial",
        description="async, buffered: the staleness weight s(x) of an update x server updates old: "
        "constant 1; "
        "polynomial (x + 1)^(-a) (a = 0.5 is FedBuff's 1/sqrt(1 + x)); hinge 1 if x <= b else "
        "1 / (a (x - b) + 1).",
    )
    staleness_a: float = Field(0.5, ge=0, description="async, buffered: a of the staleness weight.")
    staleness_b: float = Field(4.0, ge=0, description="async, buffered: b of the hinge staleness weight.")

    @model_validator(mode="after")
    def _mode_keys(self) -> FederationConfig:
        _refuse_inapplicable(self, "federation", *_KIND_KEYS["federation"])
        if self.mode == "deadline" and self.deadline is None:
            raise ScenarioError(
                "federation.deadline", None, "set with federation.mode = 'deadline'", hint="Virtual seconds."
            )
        return self


#: ``system.speed`` / ``system.availability``: the named distributions.
SPEED_KINDS = ("constant", "uniform", "lognormal", "tiers", "trace")
AVAILABILITY_KINDS = ("always", "bernoulli", "periodic", "trace")


class SystemConfig(_Section):
    """Simulated devices: compute speed, communication time, availability, dropouts (docs/async.md).

    Every client's draw derives from (seed, client); every client-round then takes virtual time:
    download + compute + upload. The default (equal speeds, always available, no dropouts, no
    communication time) changes nothing in a sync run."""

    speed: Literal[SPEED_KINDS] = Field(  # type: ignore[valid-type]
        "constant",
        description="Per-client compute speed, in samples per virtual second: constant (speed_mean); uniform "
        "(speed_low to speed_high); lognormal (median speed_mean, log-sd speed_sigma); tiers (speed_tiers); "
        "trace (speed_trace).",
    )
    speed_mean: float = Field(100.0, gt=0, description="constant, lognormal: samples per second (median).")
    speed_low: float = Field(10.0, gt=0, description="uniform: slowest speed.")
    speed_high: float = Field(100.0, gt=0, description="uniform: fastest speed.")
    speed_sigma: float = Field(0.5, ge=0, description="lognormal: standard deviation of log speed.")
    speed_tiers: list[list[float]] = Field(
        default_factory=lambda: [[0.5, 100.0], [0.3, 30.0], [0.2, 10.0]],
        description="tiers: [share of clients, speed] pairs (shares summing to 1), device classes as in "
        "FedScale.",
    )
    speed_trace: str | None = Field(
        None, description="trace: a CSV file with columns client,speed (every client listed once)."
    )
    latency: float = Field(0.0, ge=0, description="Virtual seconds each transfer (download, upload) waits.")
    bandwidth: float | None = Field(
        None,
        gt=0,
        description="Bytes per virtual second of each transfer (unset: instant); the model's bytes move "
        "twice.",
    )
    availability: Literal[AVAILABILITY_KINDS] = Field(  # type: ignore[valid-type]
        "always",
        description="always; bernoulli (each client available with probability availability_p, drawn per "
        "availability_window or per round); periodic (online availability_online of every "
        "availability_period, each client at its own phase: day and night); trace (availability_trace).",
    )
    availability_p: float = Field(
        0.8, gt=0, le=1, description="bernoulli: probability a client is available."
    )
    availability_window: float | None = Field(
        None, gt=0, description="bernoulli: virtual seconds a draw lasts (unset: one draw per round)."
    )
    availability_period: float = Field(86400.0, gt=0, description="periodic: virtual seconds of a day.")
    availability_online: float = Field(0.5, gt=0, le=1, description="periodic: share of each period online.")
    availability_trace: str | None = Field(
        None,
        description="trace: a CSV file with columns client,available_from,available_to (virtual seconds; "
        "several rows per client allowed).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Probability that a started client-round drops out: its update never arrives.",
    )
    tail_slowdown: float = Field(
        0.0,
        ge=0,
        description="Intertwined heterogeneity: a client's speed is divided by 1 + tail_slowdown * t, with t "
        "the share of its samples in tail classes (eval.shot_rule's split).",
    )
    tail_unavailability: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Intertwined heterogeneity: a client's availability (availability_p, "
        "availability_online) "
        "is multiplied by 1 - tail_unavailability * t.",
    )

    @model_validator(mode="after")
    def _complete(self) -> SystemConfig:
        if self.speed == "trace" and not self.speed_trace:
            raise ScenarioError(
                "system.speed_trace", None, "a CSV file (client,speed) with system.speed = 'trace'"
            )
        if self.availability == "trace" and not self.availability_trace:
            raise ScenarioError(
                "system.availability_trace",
                None,
                "a CSV file (client,available_from,available_to) with system.availability = 'trace'",
            )
        if self.speed == "uniform" and self.speed_low > self.speed_high:
            raise ScenarioError(
                "system.speed_low", self.speed_low, f"at most system.speed_high = {self.speed_high}"
            )
        if self.speed == "tiers":
            shares = [t[0] for t in self.speed_tiers]
            bad = [t for t in self.speed_tiers if len(t) != 2 or not (0 < t[0] <= 1) or not t[1] > 0]
            if bad or not self.speed_tiers or abs(sum(shares) - 1) > 1e-6:
                raise ScenarioError(
                    "system.speed_tiers",
                    self.speed_tiers,
                    "[share, speed] pairs with shares in (0, 1] summing to 1 and speeds > 0",
                )
        return self


class AttackConfig(_Section):
    """Adversarial robustness evaluation (docs/robustness.md): an attack on the evaluated model's
    inputs at every full evaluation, reported as robust_* metrics."""

    kind: Literal[ATTACK_KINDS] = Field(  # type: ignore[valid-type]
        "none",
        description="none: no attack; fgsm: one step of length eps along the loss gradient's sign (linf) "
        "or direction (l2); pgd: projected gradient descent, steps steps of step_size from a random start.",
    )
    norm: Literal[ATTACK_NORMS] = Field(  # type: ignore[valid-type]
        "linf", description="The perturbation budget's norm: linf or l2 (over each whole input)."
    )
    eps: float | None = Field(
        None,
        gt=0,
        description="Budget radius, in the model's normalised input space ((x - mean) / std; a pixel "
        "budget e is e / std there). Required with fgsm and pgd.",
    )
    steps: int | None = Field(None, ge=1, description="pgd: ascent steps; unset: 10.")
    step_size: float | None = Field(None, gt=0, description="pgd: step length; unset: 2.5 * eps / steps.")
    random_start: bool | None = Field(
        None,
        description="pgd: start from a uniform point of the eps ball, drawn from (seed, 'attack', round[, "
        "client]); unset: true.",
    )
    personalized: bool = Field(
        False,
        description="Also attack each client's personalised model on its local view "
        "(robust_personalized_accuracy); needs eval.personalized.",
    )
    also_fgsm: bool = Field(
        False,
        description="pgd: also attack the global model with FGSM of the same norm and eps and report "
        "fgsm_robust_* and fgsm_pgd_gap (FGSM-robust minus PGD-robust accuracy): a large gap is the mark "
        "of catastrophic overfitting in single-step adversarial training.",
    )
    detect: Literal["none", "successful", "all"] = Field(
        "none",
        description="Adversarial-sample detection (Lee et al. 2018): score the clean test samples and "
        "their attacked copies with the run's OOD score (an eval_ood_score plugin such as "
        "mahalanobis-ood, else the maximum softmax probability) and report adv_detection_auroc, "
        "_auprc (clean positive), _fpr_at_95_tpr, _n and _score. successful: only pairs whose clean "
        "sample is classified correctly and whose attack succeeds; all: every pair; none: off.",
    )

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> AttackConfig:
        if self.kind == "none":
            defaults = {"norm": "linf", "eps": None, "steps": None, "step_size": None}
            defaults.update(random_start=None, personalized=False, also_fgsm=False, detect="none")
            for key, default in defaults.items():
                if getattr(self, key) != default:
                    raise ScenarioError(
                        f"eval.attack.{key}", getattr(self, key), "unset with kind 'none' (no attack)"
                    )
            return self
        if self.eps is None:
            raise ScenarioError("eval.attack.eps", None, f"a float > 0 with kind {self.kind!r}")
        if self.kind == "fgsm":
            for key in ("steps", "step_size", "random_start"):
                if getattr(self, key) is not None:
                    raise ScenarioError(
                        f"eval.attack.{key}",
                        getattr(self, key),
                        "unset with kind 'fgsm' (one step of length eps from the clean input; use pgd)",
                    )
            if self.also_fgsm:
                raise ScenarioError(
                    "eval.attack.also_fgsm", True, "false with kind 'fgsm' (the attack is FGSM already)"
                )
        return self


class OodConfig(_Section):
    """Open-set evaluation (docs/ood.md): an out-of-distribution test set scored at every full
    evaluation, reported as ood_* metrics."""

    kind: Literal[OOD_KINDS] = Field(  # type: ignore[valid-type]
        "none",
        description="none: no OOD set; held-out-classes: the classes listed in classes are removed from "
        "training and from the test set and their test samples form the OOD set (the other classes are "
        "renumbered 0..C'-1 in order); dataset: the test split of another dataset (dataset, params), "
        "with the same input shape, normalised as the scenario's own data.",
    )
    classes: list[StrictInt] | None = Field(
        None, description="held-out-classes: the class ids (of the dataset as loaded) held out."
    )
    dataset: str | None = Field(
        None, description="dataset: the OOD dataset's registry name (as data.dataset, e.g. synthetic)."
    )
    params: dict[str, Any] | None = Field(
        None, description="dataset: that dataset's parameters (as under [data]); unset: its defaults."
    )

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> OodConfig:
        need = {"held-out-classes": ("classes",), "dataset": ("dataset",)}.get(self.kind, ())
        for key in ("classes", "dataset", "params"):
            value = getattr(self, key)
            if key in need and value is None:
                raise ScenarioError(f"eval.ood.{key}", None, f"set with kind {self.kind!r}")
            allowed_here = key in need or (key == "params" and self.kind == "dataset")
            if value is not None and not allowed_here:
                raise ScenarioError(f"eval.ood.{key}", value, f"unset with kind {self.kind!r}")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ScenarioError("eval.ood.classes", self.classes, "a non-empty list of distinct class ids")
        if self.classes is not None and min(self.classes) < 0:
            raise ScenarioError("eval.ood.classes", self.classes, "class ids >= 0")
        if self.dataset is not None:
            self._check_dataset(self.dataset, self.params or {})
        return self

    @staticmethod
    def _check_dataset(name: str, params: dict[str, Any]) -> None:
        """The OOD dataset is a known registry entry and takes these parameters."""
        if name not in DATASETS:
            raise ScenarioError("eval.ood.dataset", name, f"one of {', '.join(DATASETS.known())}")
        try:
            DATASETS[name].params.model_validate(params)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ScenarioError(
                f"eval.ood.params.{key}", params.get(key), f"a valid {name} parameter: {err['msg']}"
            ) from None
        except ValueError as exc:  # an outside dataset that cannot be used
            raise ScenarioError(
                "eval.ood.dataset", name, "a dataset that can be loaded", hint=str(exc)
            ) from None


class EvalConfig(_Section):
    """What evaluation measures."""

    shot_rule: Literal[SHOT_RULES] = Field(  # type: ignore[valid-type]
        "count",
        description="count: head > 100 >= medium >= 20 > tail (samples); cumulative: FedLoGe 75%/95%.",
    )
    shot_thresholds: list[StrictFloat] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Override the rule's two thresholds ([100, 20] or [0.75, 0.95]).",
    )
    personalized: bool = Field(True, description="Also measure accuracy on each client's local test view.")
    personalized_mask: Literal["auto", "none", "test-classes", "train-classes"] = Field(
        "auto",
        description="Classes hidden (logit -1e9) in each client's local-view logits, for every method: "
        "'none'; 'test-classes': those absent from the client's local test view (FedLoGe's localtest); "
        "'train-classes': those the client has no training samples of; 'auto': the mask the method's "
        "plugin asks for (eval_personalized_mask; gla-fr's `mask`), else 'none'. Every record states the "
        "mask used (personalized_mask).",
    )
    batch_size: int = Field(1024, ge=1, description="Evaluation batch size.")
    time_to_accuracy: list[StrictFloat] | None = Field(
        None,
        description="Accuracy targets in (0, 1]: summary.json gives the virtual seconds (and the round) at "
        "which "
        "the test accuracy first reached each (None: never).",
    )
    attack: AttackConfig = Field(
        default_factory=AttackConfig,
        description="Adversarial robustness evaluation ([eval.attack], below).",
    )
    ood: OodConfig = Field(
        default_factory=OodConfig,
        description="Open-set (out-of-distribution) evaluation ([eval.ood], below).",
    )

    @field_validator("time_to_accuracy")
    @classmethod
    def _targets(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(0 < t <= 1 for t in v):
            raise ValueError("accuracies in (0, 1]")
        return v

    @model_validator(mode="after")
    def _thresholds_fit_rule(self) -> EvalConfig:
        try:
            shot_thresholds(self.shot_rule, self.shot_thresholds)
        except ParameterError as exc:
            raise ScenarioError(
                "eval.shot_thresholds",
                self.shot_thresholds,
                f"{exc.allowed} for shot_rule {self.shot_rule!r}",
            ) from None
        return self

    @model_validator(mode="after")
    def _attack_needs_personalized(self) -> EvalConfig:
        if self.attack.personalized and not self.personalized:
            raise ScenarioError(
                "eval.attack.personalized", True, "false with eval.personalized = false (no local views)"
            )
        return self


class EngineConfig(_Section):
    """Where clients are trained."""

    kind: Literal["serial", "ray", "flower"] = Field(
        "serial",
        description="serial: one process, one resident model; ray: a pool of Ray actors, each with a "
        "resident model, the data shared through Ray's object store; flower: Flower ClientApps on "
        "Flower's Simulation Runtime (one SuperNode per client), or on the Grid of `flwr run`.",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N; data and model live there.")
    threads: int | Literal["auto"] | None = Field(
        "auto",
        description="torch intra-op threads for client training. serial: 'auto' takes the cores other "
        "processes leave idle when the run starts (at least 1; never oversubscribes a busy machine), "
        "more than 1 only if the run's own step, timed at start-up, is clearly faster with them; fixed "
        "for the run and written to its scenario.toml; ray/flower: per worker, 'auto' = "
        "int(num_cpus). BLAS sums in a thread-count-dependent order, so runs agree bit for bit when this "
        "matches; set a number to pin it.",
    )
    vectorize: Literal["auto", "on", "off"] = Field(
        "auto",
        description="serial: train a round's clients in groups at once (torch.func vmap over stacked "
        "client parameters) instead of one by one; auto = on with CUDA, off on a CPU (where vmap is slower). "
        "See docs/vectorized.md.",
    )
    group_size: int | None = Field(
        None,
        ge=1,
        description="serial, vectorize: at most this many clients trained together per group (unset: as "
        "many as fit in memory, measured on the first round; a group that runs out of memory is retried in "
        "halves).",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Autocast dtype of each local training step's forward pass and loss (bfloat16 on CUDA), "
        "on every engine.",
    )
    num_workers: int = Field(2, ge=1, description="ray/flower: actors in the pool (clients trained at once).")
    num_cpus: float = Field(
        1.0, gt=0, description="ray/flower: CPUs reserved per worker (per client being trained)."
    )
    num_gpus: float = Field(
        0.0, ge=0, description="ray/flower: GPUs (or a fraction) per worker; > 0 trains on cuda."
    )
    address: str | None = Field(
        None,
        description='ray/flower: join a running Ray cluster ("auto" or host:port); unset starts a local Ray.',
    )
    max_retries: int = Field(
        1, ge=0, description="ray/flower: re-runs of a client task that failed before the run fails."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
            raise ValueError("'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("an integer >= 1, 'auto' or unset")
        return v

    @model_validator(mode="after")
    def _serial_only_keys(self) -> EngineConfig:
        """``vectorize`` and ``group_size`` are the serial engine's: Ray and Flower train one client
        per task, so setting them there would be silently ignored; refuse it instead."""
        if self.kind == "serial":
            _refuse_inapplicable(self, "engine", *_KIND_KEYS["engine"])  # ray/flower's keys
            return self
        if self.vectorize != "auto":
            raise ScenarioError(
                "engine.vectorize",
                self.vectorize,
                f"'auto' (unset) with engine.kind = {self.kind!r}",
                hint="Vectorized groups are an option of the serial engine; Ray and Flower workers train "
                "one client per task.",
            )
        if self.group_size is not None:
            raise ScenarioError(
                "engine.group_size",
                self.group_size,
                f"unset with engine.kind = {self.kind!r}",
                hint="Groups are the serial engine's vectorized mode; Ray and Flower workers train one "
                "client per task.",
            )
        return self


class LogConfig(_Section):
    """Where each evaluation's metrics go besides metrics.jsonl and metrics.csv (always written)."""

    tensorboard: bool = Field(False, description="Also write TensorBoard event files to <run>/tensorboard.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (pip install wandb).")
    wandb_project: str = Field("fedlt", min_length=1, description="wandb: the project name.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="wandb: 'offline' writes <run>/wandb for `wandb sync` (no network needed)."
    )
    events: bool = Field(
        True,
        description="Write <run>/events.jsonl: every client start, arrival, drop and server update on the "
        "virtual clock (the timeline and staleness plots read it).",
    )


class CheckpointConfig(_Section):
    """How often the run is saved for `fedlt resume`."""

    every: int | None = Field(
        None,
        ge=1,
        description="Checkpoint every this many rounds (and always after the last). Unset: every round, "
        "and in federation.mode = 'async' every `concurrency` server updates (as often, in client work, as a "
        "synchronous round; a checkpoint after every asynchronous update would cost more than the update).",
    )


class PluginSpec(BaseModel):
    """One `[[plugins]]` table: `name` plus that plugin's own parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Plugin name as `fedlt plugins` lists it.")
    params: dict[str, Any] = Field(default_factory=dict, description="The plugin's parameters.")

    @model_validator(mode="before")
    @classmethod
    def _inline_params(cls, data: Any) -> Any:
        # Users write parameters inline in the table; gather them into `params`.
        if isinstance(data, Mapping) and "params" not in data:
            data = dict(data)
            if "name" not in data:
                raise ScenarioError("plugins[].name", None, "set: every [[plugins]] table names its plugin")
            return {"name": data.pop("name"), "params": data}
        return data


class Scenario(_Section):
    """A whole experiment: data, split, model, training, federation, evaluation, engine, plugins."""

    name: str = Field(
        "scenario",
        min_length=1,
        max_length=80,
        description="Run name (used in output folder names): letters, digits, spaces and . _ + = -, "
        "starting with a letter or digit (no / or ..).",
    )
    seed: int = Field(0, ge=0, description="Every random draw derives from (seed, round, client).")
    data: DataConfig = Field(default_factory=DataConfig)
    long_tail: LongTailConfig = Field(default_factory=LongTailConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    plugins: list[PluginSpec] = Field(default_factory=list, description="Remedies, applied in this order.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The name becomes a folder under runs/: nothing that could climb out of it.
        if ".." in value or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._+=-]*", value):
            raise ValueError(
                "a name of letters, digits, spaces and . _ + = - that starts with a letter or digit and "
                "holds no '..' (it names the run folder under runs/)"
            )
        return value

    @model_validator(mode="after")
    def _availability_fits_mode(self) -> Scenario:
        sys_, mode = self.system, self.federation.mode
        if (
            mode in ("async", "buffered")
            and sys_.availability == "bernoulli"
            and sys_.availability_window is None
        ):
            raise ScenarioError(
                "system.availability_window",
                None,
                f"set with system.availability = 'bernoulli' and federation.mode = {mode!r}",
                hint="Asynchronous clients start at any moment, so availability is drawn per window of "
                "virtual seconds, not per round.",
            )
        return self

    @model_validator(mode="after")
    def _stream_keys_fit(self) -> Scenario:
        st = self.stream
        if st.kind == "none" and st.seed is not None:
            raise ScenarioError("stream.seed", st.seed, "unset without a stream (stream.kind = 'none')")
        if st.pacing == "proportional" and self.federation.mode in ("async", "buffered"):
            raise ScenarioError(
                "stream.pacing",
                st.pacing,
                f"'constant' with federation.mode = {self.federation.mode!r}",
                hint="Proportional pacing ends every client's task in the same round; asynchronous "
                "clients share no round.",
            )
        return self

    @model_validator(mode="after")
    def _concurrency_fits(self) -> Scenario:
        c, n = self.federation.concurrency, self.partition.n_clients
        if c is not None and c > n:
            raise ScenarioError(
                "federation.concurrency",
                c,
                f"at most partition.n_clients = {n} (one client trains once at a time)",
            )
        return self

    @model_validator(mode="after")
    def _unique_plugins(self) -> Scenario:
        seen: set[str] = set()
        for i, spec in enumerate(self.plugins):
            if spec.name in seen:
                raise ScenarioError(
                    f"plugins[{i}].name", spec.name, "listed once", hint="Merge the two tables."
                )
            seen.add(spec.name)
        return self


# --------------------------------------------------------------------------- loading


def builtin_scenario_path(name: str) -> Path:
    """Path of a scenario shipped inside the package (``quickstart`` is the embedded default)."""
    path = Path(__file__).parent / "builtin" / f"{name}.toml"
    if not path.is_file():
        raise ScenarioError("scenario", name, "a scenario file path or a built-in name: quickstart")
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML; unreadable, non-UTF-8 or malformed files are scenario errors."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(
            "scenario", str(path), "a readable file", hint=f"Reading it failed: {exc}."
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ScenarioError(
            "scenario",
            str(path),
            "a UTF-8 encoded TOML file",
            hint=f"Byte {exc.start} (line {line}) is {data[exc.start : exc.start + 1]!r}, not UTF-8; "
            "save the file as UTF-8.",
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError("scenario", str(path), "valid TOML", hint=f"Parser says: {exc}.") from None


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make relative :data:`PATH_KEYS` absolute against ``base`` (the scenario file's folder)."""
    for section, key in PATH_KEYS:
        table = raw.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            table[key] = str((base / value).resolve())


def load_scenario(
    source: str | Path | Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()
) -> Scenario:
    """Read a scenario (path, built-in name or dict), apply ``key.sub=value`` overrides, validate.

    Relative ``data.root``, ``data.cache_dir`` and ``model.pretrained`` (in the file or set by an
    override) are resolved against the scenario file's folder so a scenario works from any working
    directory.

    Raises
    ------
    ScenarioError
        A missing, unreadable, non-UTF-8 or malformed file, a malformed override, or any value the
        scenario's rules do not allow.
    """
    base: Path | None = None
    if isinstance(source, Mapping):
        raw = _deep_copy(source)
    else:
        path = Path(source)
        if not path.exists() and not path.suffix:
            path = builtin_scenario_path(str(source))
        if not path.is_file():
            raise ScenarioError(
                "scenario", str(source), "an existing .toml file or a built-in name: quickstart"
            )
        raw = _read_toml(path)
        base = path.resolve().parent
    raw = apply_overrides(raw, overrides)
    if base is not None:
        _resolve_paths(raw, base)
    return scenario_from_dict(raw)


def scenario_from_dict(raw: Mapping[str, Any]) -> Scenario:
    """Validate a plain dict into a :class:`Scenario`, turning pydantic errors into ScenarioError."""
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise _scenario_error(exc, raw) from None


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``3``, ``0.5``, ``true``, ``[32, 64]``, ``"x"``), else
    the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _registry_sections() -> dict[str, type[RegistrySection]]:
    """Scenario key -> section class, for every section derived from a registry."""
    out = {}
    for key, field in Scenario.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, RegistrySection):
            out[key] = ann
    return out


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (strings as on the command line, or a mapping of dotted keys).

    ``plugins.0.gamma=1`` addresses the first plugin table. Keys may use ``__`` for ``.`` so that
    Python keyword arguments work: ``fedlt.run(path, federation__rounds=3)``. An override that
    switches a registry choice (``model.name``, ``data.dataset``, ``partition.kind``,
    ``long_tail.profile``) drops that section's parameters the new choice does not take, unless an
    override sets them too: ``--set model.name=cnn`` on a file written for ``mlp`` leaves its
    ``hidden`` behind rather than failing on it.
    """
    raw = _deep_copy(raw)
    if isinstance(overrides, Mapping):
        items = [(k.replace("__", "."), v) for k, v in overrides.items()]
    else:
        items = []
        for text in overrides:
            key, sep, value = text.partition("=")
            if not sep or not key.strip():
                raise ScenarioError("--set", text, "of the form key.sub=value, e.g. federation.rounds=5")
            items.append((key.strip(), parse_value(value.strip())))
    _drop_stale_parameters(raw, items)
    for key, value in items:
        parts = key.split(".")
        if not all(parts):
            raise ScenarioError("--set", key, "a dotted key without empty parts, e.g. federation.rounds")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            node = _descend(node, part, parts[: i + 1], key)
        last = parts[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, key)
            node[idx] = value
        else:
            node[last] = value
    return raw


def _drop_stale_parameters(raw: dict[str, Any], items: list[tuple[str, Any]]) -> None:
    """Remove parameters a switched registry choice (or kind: ``engine.kind``, ``stream.kind``,
    ``federation.mode``) does not take (see :func:`apply_overrides`)."""
    set_keys = {key for key, _ in items}
    for section, (selector, kinds) in _KIND_KEYS.items():
        chosen = [v for k, v in items if k == f"{section}.{selector}"]
        table = raw.get(section)
        if chosen and isinstance(table, dict):
            for key, users in kinds.items():
                if chosen[-1] not in users and f"{section}.{key}" not in set_keys:
                    table.pop(key, None)
    for section, cls in _registry_sections().items():
        chosen = [v for k, v in items if k == f"{section}.{cls.__selector__}"]
        table = raw.get(section)
        if not chosen or not isinstance(table, dict) or chosen[-1] not in cls.__registry__:
            continue
        try:
            takes = cls.__registry__[chosen[-1]].takes
        except OutsideEntryError:
            continue  # validation reports it, naming the key
        stale = set(cls.__registry__.parameters()) | set(_outside_takes(cls, table.get(cls.__selector__)))
        for key in list(table):
            if key in stale and key not in takes and f"{section}.{key}" not in set_keys:
                del table[key]


def _outside_takes(cls: type[RegistrySection], name: Any) -> tuple[str, ...]:
    """The parameters of the outside entry a table chose before an override switched it (none for a
    built-in or an unusable one)."""
    registry = cls.__registry__
    if name not in registry or registry.is_builtin(name):
        return ()
    try:
        return registry[name].takes
    except OutsideEntryError:
        return ()


def _field_of(path: list[str]) -> FieldInfo | None:
    """The schema field a dotted path (no list indices) names, or None past a free-form table."""
    model: type[BaseModel] = Scenario
    field: FieldInfo | None = None
    for part in path:
        if model is None or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, _Section) else None  # type: ignore[assignment]
    return field


def _descend(node: Any, part: str, path: list[str], key: str) -> Any:
    """The table (or plugin list) at ``part`` under ``node``, created if absent.

    A part that holds, or by the schema must hold, a single value cannot be descended into:
    ``--set seed.x=1`` is an error naming ``seed``, not a crash or a silently built table.
    """
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    at = ".".join(path)
    field = _field_of(path)
    table_field = (
        field is None
        or part == "plugins"
        or (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    )
    current = node.get(part)
    if not table_field or (current is not None and not isinstance(current, dict | list)):
        error = ScenarioError(key, None, f"a key inside a table, but {at!r} is a single value")
        shown = f" ({current!r})" if current is not None else ""
        error.args = (
            f"Cannot set {key!r}: {at!r} holds a single value{shown}, not a table of keys. "
            f"Set it with --set {at}=VALUE.",
        )
        raise error
    child = node.setdefault(part, [] if part == "plugins" else {})
    if part == "plugins" and not isinstance(child, list):
        raise ScenarioError(key, child, "a list of [[plugins]] tables")
    return child


def _list_index(node: list[Any], part: str, key: str) -> int:
    # Index len(node) appends a new table: `--set plugins.0.name=focal` adds a first plugin.
    if not part.isdigit() or int(part) > len(node):
        raise ScenarioError(key, part, f"an index from 0 to {len(node)} ({len(node)} appends a new table)")
    if int(part) == len(node):
        node.append({})
    return int(part)


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Scenario
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif ann is not None and getattr(ann, "__args__", None):
            inner = [a for a in ann.__args__ if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner:
                model = inner[0]
    return sorted(model.model_fields)


def _scenario_error(exc: ValidationError, raw: Mapping[str, Any]) -> ScenarioError:
    errors: list[ScenarioError] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ScenarioError):
            one = ctx_error
            index = next((p for p in loc if isinstance(p, int)), None)
            if "[]" in one.key and index is not None:  # a [[plugins]] table's validator cannot know its index
                one = ScenarioError(one.key.replace("[]", f"[{index}]"), one.value, one.allowed, one.hint)
        elif err["type"] == "extra_forbidden":
            key = _dotted(loc)
            section = _dotted(loc[:-1]) or "the top level"
            allowed = ", ".join(_allowed_keys(loc))
            one = ScenarioError(key, err.get("input"), f"a known key; [{section}] takes: {allowed}")
            one.args = (
                f"Unknown key {key!r} (value {err.get('input')!r}). Keys allowed in {section}: {allowed}.",
            )
        elif err["type"] == "missing":
            one = ScenarioError(_dotted(loc), None, "set", hint="This key is required.")
        else:
            one = ScenarioError(_dotted(loc), err.get("input", _lookup(raw, loc)), readable_constraint(err))
        errors.append(one)
    return _combine(errors)


# --------------------------------------------------------------------------- writing


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def scenario_to_toml(scenario: Scenario) -> str:
    """The fully resolved scenario as TOML.

    Every default is spelled out, the chosen dataset's, profile's, partitioner's and model's
    parameters included; keys that are unset (None) are omitted.
    """
    import tomli_w

    # Python mode, not JSON: JSON mode turns inf into None (then dropped); TOML writes inf.
    data = _strip_none(scenario.model_dump())
    data["plugins"] = [{"name": p["name"], **p["params"]} for p in data["plugins"]]
    if not data["plugins"]:
        del data["plugins"]
    return tomli_w.dumps(data)
