"""Scenario files: TOML validated into typed models when loaded.

A scenario is validated once, at the boundary (load time), and every later step trusts it. Bad
input becomes a :class:`~fedlt.errors.ScenarioError` naming the dotted key, the value given and
what is allowed; the CLI prints it and exits 2 before any work starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedlt.errors import ScenarioError

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EngineConfig",
    "EvalConfig",
    "FederationConfig",
    "LongTailConfig",
    "ModelConfig",
    "PartitionConfig",
    "PluginSpec",
    "Scenario",
    "StreamConfig",
    "TrainConfig",
    "apply_overrides",
    "builtin_scenario_path",
    "load_scenario",
    "parse_value",
    "scenario_from_dict",
    "scenario_to_toml",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Which dataset, from where, and how samples are prepared."""

    dataset: Literal[
        "digits", "synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagefolder"
    ] = Field("digits", description="Dataset from the registry.")
    root: str | None = Field(
        None,
        description="Local folder (torchvision datasets) or folder/.tar/.tar.gz (imagefolder). "
        "Relative paths are relative to the scenario file.",
    )
    download: bool = Field(False, description="Let torchvision download into `root` when files are missing.")
    test_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Held-out test share for datasets without a test split (digits, imagefolder).",
    )
    cache_dir: str | None = Field(
        None,
        description="Where decoded imagefolder arrays are cached (default $FEDLT_CACHE or ~/.cache/fedlt).",
    )
    image_size: int | None = Field(None, gt=0, description="Resize imagefolder images to this square size.")
    n_train: int = Field(5000, gt=0, description="synthetic: training samples.")
    n_test: int = Field(1000, gt=0, description="synthetic: test samples.")
    num_classes: int = Field(10, ge=2, description="synthetic: number of classes.")
    shape: list[int] = Field([20], min_length=1, description="synthetic: per-sample shape, e.g. [3, 32, 32].")
    separation: float = Field(
        1.0, ge=0, description="synthetic: how far apart class means are (larger = easier)."
    )
    augment: Literal["none", "crop-flip"] = Field(
        "none", description="Training-time augmentation of image batches (random 4-pixel-padded crop + flip)."
    )

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, v: list[int]) -> list[int]:
        if any(s <= 0 for s in v):
            raise ValueError("a list of positive ints")
        return v


class LongTailConfig(_Section):
    """The long-tailed profile applied to the training set before it is split across clients."""

    profile: Literal["none", "exponential", "step"] = Field(
        "none", description="exponential: n_i = floor(n_max * IF^(-i/(C-1))); step: two levels."
    )
    imbalance_factor: float = Field(1.0, ge=1, description="IF = n_max / n_min (100 means a 100:1 tail).")
    n_max: int | None = Field(
        None, gt=0, description="Samples kept for the head class (default: all it has)."
    )
    fraction_minority: float = Field(0.5, gt=0, lt=1, description="step: share of classes that are minority.")


class PartitionConfig(_Section):
    """How the (long-tailed) training set is split across clients."""

    kind: Literal["dirichlet", "dirichlet-equal", "shards", "iid"] = Field(
        "dirichlet",
        description="dirichlet: per-class Dir(alpha) (FedLoGe); dirichlet-equal: equal-size clients (CReFF); "
        "shards: k label-sorted shards per client; iid.",
    )
    n_clients: int = Field(10, ge=1, description="Number of clients.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller = more skewed clients).")
    min_client_size: int = Field(
        0, ge=0, description="dirichlet: redraw until every client has this many samples."
    )
    shards_per_client: int = Field(2, ge=1, description="shards: shards (about classes) per client.")


class StreamConfig(_Section):
    """Continual learning: each client's data arrives as a stream of tasks (Si-Blurry)."""

    kind: Literal["none", "si-blurry", "i-blurry"] = Field(
        "none",
        description="none: offline federated learning; si-blurry: stochastic blurry task boundaries per "
        "client (Moon et al. 2023); i-blurry: the non-stochastic variant (equal splits).",
    )
    n_tasks: int = Field(5, ge=1, description="Tasks T per client stream.")
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
    eval_period: int = Field(1, ge=1, description="Anytime evaluation every this many rounds.")


MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "mlp": ("hidden",),
    "cnn": ("widths",),
    "resnet8": ("width",),
    "resnet20": ("width",),
    "resnet32": ("width",),
    "vit": ("patch_size", "dim", "depth", "heads", "pretrained"),
}


class ModelConfig(_Section):
    """The network; every model has a `features(x)` / `head` split."""

    name: Literal["mlp", "cnn", "resnet8", "resnet20", "resnet32", "vit"] = Field(
        "mlp", description="Model registry name."
    )
    hidden: list[int] | None = Field(None, description="mlp: hidden layer widths (default [128, 64]).")
    widths: list[int] | None = Field(None, description="cnn: channels per conv block (default [16, 32]).")
    width: int | None = Field(None, gt=0, description="resnet*: first-stage width (default 16).")
    patch_size: int | None = Field(None, gt=0, description="vit: patch size in pixels (default 4).")
    dim: int | None = Field(None, gt=0, description="vit: token width (default 64).")
    depth: int | None = Field(None, gt=0, description="vit: transformer blocks (default 4).")
    heads: int | None = Field(None, gt=0, description="vit: attention heads (default 4).")
    pretrained: str | None = Field(
        None, description="vit: a local file with pretrained weights (a state dict) to start from."
    )

    @model_validator(mode="after")
    def _params_fit_model(self) -> ModelConfig:
        takes = MODEL_KEYS[self.name]
        for key in sorted({k for keys in MODEL_KEYS.values() for k in keys}):
            if getattr(self, key) is not None and key not in takes:
                raise ScenarioError(
                    f"model.{key}",
                    getattr(self, key),
                    f"unset for model {self.name!r}",
                    hint=f"Model {self.name!r} takes: {', '.join(takes)}.",
                )
        return self

    def params(self) -> dict[str, Any]:
        """The model-specific parameters that were set, for ``build_model``."""
        return {k: v for k in MODEL_KEYS[self.name] if (v := getattr(self, k)) is not None}


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


class FederationConfig(_Section):
    """Rounds, participation and evaluation cadence."""

    rounds: int = Field(10, ge=1, description="Communication rounds.")
    fraction_clients: float = Field(1.0, gt=0, le=1, description="Share of clients selected each round.")
    eval_every: int = Field(1, ge=0, description="Evaluate every this many rounds (0: only after the last).")


class EvalConfig(_Section):
    """What evaluation measures."""

    shot_rule: Literal["count", "cumulative"] = Field(
        "count",
        description="count: head > 100 >= medium >= 20 > tail (samples); cumulative: FedLoGe 75%/95%.",
    )
    shot_thresholds: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Override the rule's two thresholds ([100, 20] or [0.75, 0.95]).",
    )
    personalized: bool = Field(True, description="Also measure accuracy on each client's local test view.")
    batch_size: int = Field(1024, ge=1, description="Evaluation batch size.")


class EngineConfig(_Section):
    """Where clients are trained."""

    kind: Literal["serial", "ray", "flower"] = Field(
        "serial",
        description="serial: one process, one resident model; ray: a pool of Ray actors, each with a "
        "resident model, the data shared through Ray's object store; flower: Flower ClientApps on "
        "Flower's Simulation Runtime (one SuperNode per client), or on the Grid of `flwr run`.",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N; data and model live there.")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for client training (serial: this process; ray/flower: each "
        "worker, default int(num_cpus)). BLAS sums in a thread-count-dependent order, so engines agree bit "
        "for bit when this matches.",
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


class CheckpointConfig(_Section):
    """How often the run is saved for `fedlt resume`."""

    every: int = Field(1, ge=1, description="Checkpoint every this many rounds (and always after the last).")


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

    name: str = Field("scenario", min_length=1, description="Run name (used in output folder names).")
    seed: int = Field(0, ge=0, description="Every random draw derives from (seed, round, client).")
    data: DataConfig = Field(default_factory=DataConfig)
    long_tail: LongTailConfig = Field(default_factory=LongTailConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    plugins: list[PluginSpec] = Field(default_factory=list, description="Remedies, applied in this order.")

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
    path = Path(__file__).parent / "scenarios" / f"{name}.toml"
    if not path.is_file():
        raise ScenarioError("scenario", name, "a scenario file path or a built-in name: quickstart")
    return path


def load_scenario(
    source: str | Path | Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any] = ()
) -> Scenario:
    """Read a scenario (path, built-in name or dict), apply ``key.sub=value`` overrides, validate.

    Relative ``data.root``, ``data.cache_dir`` and ``model.pretrained`` are resolved against the
    scenario file's folder so a scenario works from any working directory.
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
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError("scenario", str(path), "valid TOML", hint=f"Parser says: {exc}.") from None
        base = path.resolve().parent
    raw = apply_overrides(raw, overrides)
    scenario = scenario_from_dict(raw)
    if base is not None:
        for section, key in (("data", "root"), ("data", "cache_dir"), ("model", "pretrained")):
            value = getattr(getattr(scenario, section), key)
            if value and not Path(value).expanduser().is_absolute():
                setattr(getattr(scenario, section), key, str((base / value).resolve()))
    return scenario


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


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (strings as on the command line, or a mapping of dotted keys).

    ``plugins.0.gamma=1`` addresses the first plugin table. Keys may use ``__`` for ``.`` so that
    Python keyword arguments work: ``fedlt.run(path, federation__rounds=3)``.
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
    for key, value in items:
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            node = _descend(node, part, ".".join(parts[: i + 1]))
        last = parts[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, key)
            node[idx] = value
        else:
            node[last] = value
    return raw


def _descend(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    if not isinstance(node, dict):
        raise ScenarioError(key, node, "a table to set keys in")
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


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


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
    messages: list[str] = []
    first: ScenarioError | None = None
    for err in exc.errors():
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, ScenarioError):
            one = ctx_error
        else:
            loc = tuple(err["loc"])
            key = _dotted(loc)
            if err["type"] == "extra_forbidden":
                section = _dotted(loc[:-1]) or "the top level"
                one = ScenarioError(
                    key, err.get("input"), f"a known key; [{section}] takes: {', '.join(_allowed_keys(loc))}"
                )
                one.args = (
                    f"Unknown key {key!r} (value {err.get('input')!r}). Keys allowed in {section}: "
                    f"{', '.join(_allowed_keys(loc))}.",
                )
            elif err["type"] == "missing":
                one = ScenarioError(key, None, "set", hint="This key is required.")
            else:
                allowed = err["msg"]
                allowed = re.sub(r"^(Input should be|Value error, )\s*", "", allowed)
                value = err.get("input", _lookup(raw, loc))
                one = ScenarioError(key, value, allowed)
        first = first or one
        messages.append(str(one))
    assert first is not None  # a ValidationError always has at least one error
    if len(messages) > 1:
        first.args = (" ".join(messages),)
    return first


# --------------------------------------------------------------------------- writing


def _strip_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_none(v) for v in value]
    return value


def scenario_to_toml(scenario: Scenario) -> str:
    """The fully resolved scenario as TOML (every default spelled out; unset optional keys omitted)."""
    import tomli_w

    data = _strip_none(scenario.model_dump(mode="json"))
    data["plugins"] = [{"name": p["name"], **p["params"]} for p in data["plugins"]]
    if not data["plugins"]:
        del data["plugins"]
    return tomli_w.dumps(data)
