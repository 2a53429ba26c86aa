"""Compare finished runs: group runs that differ only in seed, summarise each metric, pair by seed.

A single seed says little about a remedy on a long tail: the tail holds few samples and its accuracy
moves a lot from seed to seed. This module turns a set of run folders into a table of mean, sample
standard deviation and a Student-t 95% confidence interval per group and metric, and, against a named
baseline group, the paired per-seed differences (pairing removes the variance that the two groups
share through the seed: same long tail, same split, same initial weights).

Runs belong to the same group when their resolved scenarios are equal once ``seed``, ``name`` and the
settings that cannot change a number are removed: :data:`IGNORED_KEYS` (loggers, checkpointing,
where and on how many threads or workers it ran, evaluation batch size, data locations) and plugins
that only observe (:func:`observer_plugins`: every hook they implement is one of
:data:`OBSERVER_HOOKS`). A run whose settings were changed mid-run (``fedlt resume --set``, recorded
in ``summary["resumes"]``) is kept apart from runs that ran with one setting throughout. A group is
labelled by the settings in which the groups differ, e.g. ``plugins=[focal]`` or ``train.lr=0.1``.

Intervals of metrics with a known range (accuracies, ``a_auc``, ROC AUC in [0, 1]; ``f_last`` in
[-1, 1]; see :func:`metric_bounds`) are clipped to that range: the true mean lies in the range, so
clipping removes only impossible values and keeps the interval's coverage exactly.

Nothing here imports matplotlib; ``fedlt.analysis.plotting`` reuses :func:`load_run` to read run folders
and :func:`group_runs` and :func:`summarize` to draw groups with the same bands as these tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tomllib
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlt.errors import FedltError, ScenarioError

__all__ = [
    "DEFAULT_METRICS",
    "IGNORED_KEYS",
    "OBSERVER_HOOKS",
    "ComparisonTable",
    "Group",
    "RunRecord",
    "Stat",
    "UnreadableRunError",
    "available_metrics",
    "check_metrics",
    "check_out_path",
    "collect_runs",
    "compare",
    "difference_bounds",
    "group_runs",
    "load_run",
    "metric_bounds",
    "observer_plugins",
    "summarize",
    "t_quantile_975",
]

SUMMARY = "summary.json"
SCENARIO = "scenario.toml"
METRICS = "metrics.jsonl"

#: Metrics compared by default, in this order, when at least one run's ``summary["final"]`` has them.
DEFAULT_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "head_accuracy",
    "medium_accuracy",
    "tail_accuracy",
    "auroc_macro",
    "ood_auroc",
    "ood_head_auroc",
    "ood_medium_auroc",
    "ood_tail_auroc",
    "personalized_accuracy",
    "a_auc",
    "a_last",
    "a_avg",
    "f_last",
)

#: Scenario keys (dotted; a key also covers everything below it) that cannot change a number: the
#: run's name and seed (seeds are what a group averages over), loggers, how often it was saved or
#: evaluated along the way, where the data files live, and the engine settings docs/engines.md
#: guarantees the same numbers for ("Same numbers on every engine": the engine kind, its workers
#: and resources, threads, device, vectorized groups; they move only the order of floating-point
#: sums, i.e. the last digits). ``engine.dtype`` is not here: bfloat16 autocast changes training.
IGNORED_KEYS: tuple[str, ...] = (
    "name",
    "seed",
    "log",
    "checkpoint",
    "engine.kind",
    "engine.device",
    "engine.threads",
    "engine.vectorize",
    "engine.group_size",
    "engine.num_workers",
    "engine.num_cpus",
    "engine.num_gpus",
    "engine.address",
    "engine.max_retries",
    "federation.eval_every",
    "eval.batch_size",
    "eval.time_to_accuracy",
    "data.root",
    "data.cache_dir",
    "data.download",
)

#: Hooks that watch a run without steering it: they receive the finished record or summary and
#: their return value is ignored (fedlt/hooks/hookspecs.py). A plugin implementing only these (a
#: logger) cannot change a number, so it does not split groups.
OBSERVER_HOOKS: frozenset[str] = frozenset({"server_log_metrics", "server_end"})

#: Metrics with a known range (the interval is clipped to it); see :func:`metric_bounds`.
_UNIT_METRICS = frozenset(
    {"auroc_macro", "auprc_macro", "a_auc", "a_last", "a_avg", "noise_memorised", "noise_corrected"}
) | frozenset(
    # fedlt.metrics.ood's names, spelt out here: importing it would load torch for a table.
    f"{family}{measure}"
    for family in ("ood_", "ood_head_", "ood_medium_", "ood_tail_", "adv_detection_")
    for measure in ("auroc", "auprc", "fpr_at_95_tpr")
)
#: Differences of two values in [0, 1]: forgetting, head minus tail, FGSM- minus PGD-robust accuracy.
_SIGNED_UNIT_METRICS = frozenset(
    {"f_last", "accuracy_disparity", "robust_accuracy_disparity", "fgsm_pgd_gap"}
)

#: Two-sided 95% Student t quantiles t_{0.975, df}, used when scipy is not installed.
_T975: dict[int, float] = {
    1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
    8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
    15: 2.131450, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
    22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
    29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930,
}  # fmt: skip
_Z975 = 1.959964


# --------------------------------------------------------------------------- statistics


def _t975_table(df: int) -> float:
    """t_{0.975, df} from the table, interpolated linearly in 1/df between tabulated rows.

    Linear interpolation in 1/df is the textbook rule for t tables; between 30 and infinity it is
    within 5e-4 of the exact quantile.
    """
    if df in _T975:
        return _T975[df]
    rows = sorted(_T975)
    lower = max(d for d in rows if d < df)
    upper = min((d for d in rows if d > df), default=None)
    t_low, t_up = _T975[lower], (_Z975 if upper is None else _T975[upper])
    inv_up = 0.0 if upper is None else 1.0 / upper
    w = (1.0 / lower - 1.0 / df) / (1.0 / lower - inv_up)
    return t_low + w * (t_up - t_low)


def t_quantile_975(df: int, use_scipy: bool = True) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (half-width factor of a 95% CI).

    Parameters
    ----------
    df : int
        Degrees of freedom, >= 1 (n - 1 for a mean of n values).
    use_scipy : bool, default=True
        Use ``scipy.stats.t.ppf`` when scipy is importable; otherwise (or when False) the table of
        :data:`_T975`, exact to 6 decimals at tabulated df, interpolated in 1/df elsewhere.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if use_scipy:
        try:
            from scipy import stats
        except ImportError:
            pass
        else:
            return float(stats.t.ppf(0.975, df))
    return _t975_table(int(df))


def metric_bounds(metric: str) -> tuple[float, float] | None:
    """The range a metric's values (hence its mean) cannot leave, or ``None`` when unknown.

    Accuracies of every kind (names ending in ``accuracy``: balanced, head, tail, personalised,
    anytime), ``auroc_macro``, ``a_auc``, ``a_last`` and ``a_avg`` (also with ``_personalized``),
    the OOD detection metrics (``ood_auroc``, ``ood_auprc``, ``ood_fpr_at_95_tpr``, their
    ``ood_head_*`` / ``ood_medium_*`` / ``ood_tail_*`` per-group forms and ``adv_detection_*``),
    ``auprc_macro`` and the shares of noisy samples memorised or corrected lie in [0, 1];
    ``f_last`` (a best accuracy minus a final one), the head-tail disparities and ``fgsm_pgd_gap``
    in [-1, 1]. Plugin metrics
    (``"<plugin>.<name>"``) have no range fedlt knows.
    """
    if "." in metric:
        return None
    base = metric.removesuffix("_personalized")
    if base.endswith("accuracy") or base in _UNIT_METRICS:
        return (0.0, 1.0)
    if base in _SIGNED_UNIT_METRICS:
        return (-1.0, 1.0)
    return None


def difference_bounds(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range of a difference of two values in ``bounds``: [lo - hi, hi - lo]."""
    if bounds is None:
        return None
    lo, hi = bounds
    return (lo - hi, hi - lo)


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (ddof=1) and 95% Student-t confidence interval of some values.

    ``std`` and the interval are ``None`` for fewer than two values; every field but ``n`` and
    ``values`` is ``None`` for none. With ``bounds`` the interval is clipped to them (the true mean
    lies there), so it may be asymmetric around the mean.
    """

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...] = ()
    bounds: tuple[float, float] | None = None

    @property
    def half_width(self) -> float | None:
        """t_{0.975, n-1} · std / sqrt(n): half the width of the unclipped 95% interval."""
        if self.std is None:
            return None
        return t_quantile_975(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def clipped(self) -> bool:
        """Whether the metric's range cut the t interval."""
        if self.bounds is None or self.ci_low is None or self.ci_high is None or self.mean is None:
            return False
        half = self.half_width or 0.0
        return self.mean - half < self.bounds[0] or self.mean + half > self.bounds[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "values": list(self.values),
            "bounds": None if self.bounds is None else list(self.bounds),
        }


def summarize(values: Iterable[float], bounds: tuple[float, float] | None = None) -> Stat:
    """:class:`Stat` of ``values``: mean, std with ddof=1 and mean ± t_{0.975, n-1} · std / sqrt(n).

    Parameters
    ----------
    values : iterable of float
    bounds : (low, high), optional
        The range the quantity lies in (:func:`metric_bounds`); the interval is clipped to it.
        Clipping keeps the coverage of the t interval exactly (the true mean is inside the range,
        so the clipped interval holds it whenever the unclipped one does) and, unlike a logit or
        Wilson interval, stays defined at 0 and 1 (a tail accuracy of 0 is common) and needs no
        binomial model: seeds, not test samples, are the replicates here.
    """
    xs = tuple(float(v) for v in values)
    n = len(xs)
    if bounds is not None and not bounds[0] < bounds[1]:
        raise ValueError(f"bounds must be (low, high) with low < high, got {bounds}")
    if n == 0:
        return Stat(0, None, None, None, None, (), bounds)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stat(1, mean, None, None, None, xs, bounds)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Stat(n, mean, std, low, high, xs, bounds)


# --------------------------------------------------------------------------- run folders


@dataclass
class RunRecord:
    """What a run folder holds, read defensively (missing files give empty values).

    Attributes
    ----------
    path : Path
        The run folder.
    summary : dict
        ``summary.json`` (``{}`` if absent, e.g. a run still in progress).
    scenario : dict
        The resolved scenario from ``scenario.toml`` (``{}`` if absent), defaults filled in when it
        still validates, so runs written by older versions compare equal to newer ones.
    """

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    scenario: dict[str, Any] = field(default_factory=dict)
    _history: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The folder name (the default label in tables and plots)."""
        return self.path.name

    @property
    def final(self) -> dict[str, Any]:
        """``summary["final"]``: the last full evaluation plus continual summaries."""
        final = self.summary.get("final")
        return final if isinstance(final, dict) else {}

    @property
    def seed(self) -> int | None:
        seed = self.scenario.get("seed", self.summary.get("seed"))
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    def changes(self, ignore: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The settings changed mid-run: ``[{"round", "overrides"}]`` from ``summary["resumes"]``.

        Only resumes with overrides count, and of those only the keys outside ``ignore`` (a resume
        that changed the thread count or the loggers changed no number).
        """
        out = []
        for entry in self.summary.get("resumes") or []:
            if not isinstance(entry, Mapping):
                continue
            overrides = entry.get("overrides") or {}
            if not isinstance(overrides, Mapping):
                continue
            kept = {str(k): v for k, v in overrides.items() if not _ignored(str(k), ignore)}
            if kept:
                out.append({"round": entry.get("round"), "overrides": dict(sorted(kept.items()))})
        return out

    def metric(self, key: str) -> float | None:
        """A final metric as a float, or ``None`` when absent, not a number, or not finite."""
        return _number(self.final.get(key))

    def history(self) -> list[dict[str, Any]]:
        """The evaluation records of ``metrics.jsonl`` in file order (read once, then cached).

        Lines that do not parse (a run killed mid-write) are skipped.
        """
        if self._history is None:
            path = self.path / METRICS
            self._history = _read_records(path) if path.is_file() else []
        return self._history


class UnreadableRunError(FedltError, ValueError):
    """A file of a run folder that is not what fedlt writes there (corrupt, binary, not JSON):
    the message names the file and what is wrong, so nothing is compared or drawn from it."""


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file, one a line. A line that does not parse (a run killed
    mid-write) is skipped, with a warning unless it is the last; a file of which no line parses
    (binary or foreign data) is refused."""
    try:
        lines = [line for line in _read(path).split(b"\n") if line.strip()]
    except OSError as exc:
        raise UnreadableRunError(f"{path} cannot be read: {exc.strerror or exc}") from None
    records: list[dict[str, Any]] = []
    bad: list[int] = []  # indices of the lines skipped
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(i)
    if bad and not records:
        raise UnreadableRunError(
            f"{path} is not a {METRICS} fedlt wrote: none of its {len(lines)} lines is a JSON record"
        )
    if [i for i in bad if i != len(lines) - 1]:
        warnings.warn(f"{path}: skipped {len(bad)} lines that are not JSON records", stacklevel=3)
    return records


def _read(path: Path) -> bytes:
    return path.read_bytes()


def _read_json_object(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict, or an error naming the file and why it cannot be one."""
    try:
        loaded = json.loads(_read(path))
    except OSError as exc:
        raise UnreadableRunError(f"{path} cannot be read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError (binary data)
        why = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"not valid JSON ({exc})"
        raise UnreadableRunError(f"{path} is {why}: {_REMEDY}") from None
    if not isinstance(loaded, dict):
        raise UnreadableRunError(f"{path} holds a JSON {type(loaded).__name__}, not an object: {_REMEDY}")
    return loaded


#: What to do about a corrupt file of a finished run.
_REMEDY = "not a summary fedlt wrote; move that run folder aside or name the others"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _normalise_scenario(raw: dict[str, Any]) -> dict[str, Any]:
    """The scenario with every default filled in (plugins as ``{"name", "params"}``), or ``raw``
    itself (plugins brought to the same shape) when it no longer validates."""
    from fedlt.errors import FedltError
    from fedlt.scenario.config import scenario_from_dict

    try:
        return scenario_from_dict(raw).model_dump(mode="json")
    except (FedltError, ValueError, TypeError):
        out = dict(raw)
        plugins = []
        for spec in raw.get("plugins", []) or []:
            if isinstance(spec, dict):
                params = spec.get("params", {k: v for k, v in spec.items() if k != "name"})
                plugins.append({"name": spec.get("name"), "params": params})
        out["plugins"] = plugins
        return out


def load_run(path: str | Path, require_summary: bool = True) -> RunRecord:
    """Read one run folder.

    Parameters
    ----------
    path : path
        A folder written by ``fedlt run``.
    require_summary : bool, default=True
        Raise when ``summary.json`` is missing (a comparison needs final metrics); plots of a run
        in progress pass False and use ``metrics.jsonl``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not a folder, or holds none of ``summary.json``, ``scenario.toml`` and
        ``metrics.jsonl`` (or no ``summary.json`` when required).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a run folder (no such directory)")
    present = [n for n in (SUMMARY, SCENARIO, METRICS) if (path / n).is_file()]
    if not present or (require_summary and SUMMARY not in present):
        need = SUMMARY if require_summary else f"{SUMMARY}, {SCENARIO} or {METRICS}"
        raise FileNotFoundError(f"{path} is not a finished run folder: it holds no {need}")
    summary = _read_json_object(path / SUMMARY) if SUMMARY in present else {}
    scenario: dict[str, Any] = {}
    if SCENARIO in present:
        try:
            scenario = _normalise_scenario(tomllib.loads(_read(path / SCENARIO).decode()))
        except (OSError, ValueError) as exc:  # TOMLDecodeError, UnicodeDecodeError
            raise UnreadableRunError(
                f"{path / SCENARIO} is not a scenario fedlt wrote ({exc}); move that run folder aside"
            ) from None
    return RunRecord(path=path, summary=summary, scenario=scenario)


def collect_runs(paths: str | Path | Iterable[str | Path]) -> list[RunRecord]:
    """Every finished run under ``paths``: run folders themselves, or folders holding run folders.

    A path holding ``summary.json`` is a run; any other folder is searched (recursively) for run
    folders, in sorted order. Unfinished runs found while searching (``scenario.toml`` but no
    ``summary.json``) are skipped with a warning; a run named directly must be finished. Each run
    appears once even if reached twice.

    Raises
    ------
    FileNotFoundError
        For a path that does not exist, or when no run is found at all.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if (p / SUMMARY).is_file() or (p / SCENARIO).is_file():
            folders = [p]
        else:
            folders = sorted({f.parent for n in (SUMMARY, SCENARIO) for f in p.rglob(n)})
            unfinished = [f for f in folders if not (f / SUMMARY).is_file()]
            if unfinished:
                names = ", ".join(str(f) for f in unfinished)
                warnings.warn(f"skipped unfinished runs (no {SUMMARY}): {names}", stacklevel=2)
            folders = [f for f in folders if f not in unfinished]
        for folder in folders:
            key = folder.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(folder))
    if not runs:
        raise FileNotFoundError(f"no run folders (holding {SUMMARY}) under {', '.join(map(str, paths))}")
    return runs


# --------------------------------------------------------------------------- grouping


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys; lists and plugin lists stay whole values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, Mapping) and key != "plugins":
                out.update(_flatten(v, key))
            else:
                out[key] = v
        return out
    return {prefix: value}


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


def observer_plugins(names: Iterable[str]) -> set[str]:
    """The plugins among ``names`` that only observe: installed here, and every hook they implement
    is in :data:`OBSERVER_HOOKS` (a logger).

    The rule reads what a plugin implements, never what it is called: a plugin that cannot be
    loaded here (not installed, broken) or that implements no hook at all is taken to be a remedy,
    so an unknown plugin still separates groups rather than hiding a difference.
    """
    wanted = {n for n in names if isinstance(n, str)}
    if not wanted:
        return set()
    from fedlt.hooks.discovery import discover_plugins, qualified_plugin

    available = discover_plugins()
    out = set()
    for name in wanted:
        info = available.get(name) or qualified_plugin(name)
        if info is None or info.error is not None:
            continue
        hooks = set(info.hooks)
        if hooks and hooks <= OBSERVER_HOOKS:
            out.add(name)
    return out


def _plugin_specs(run: RunRecord) -> list[Any]:
    if run.scenario:
        return list(run.scenario.get("plugins") or [])
    return [{"name": n, "params": {}} for n in run.summary.get("plugins", []) or []]


def _spec_name(spec: Any) -> Any:
    return spec.get("name") if isinstance(spec, Mapping) else spec


def _without_unset(spec: Any) -> Any:
    """A plugin spec without its unset (None) parameters, which scenario.toml cannot hold."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("params"), Mapping):
        return spec
    return {**spec, "params": {k: v for k, v in spec["params"].items() if v is not None}}


#: The pseudo setting that separates runs whose settings changed mid-run (label ``changed_mid_run=...``).
CHANGED = "changed_mid_run"


def _setting_key(run: RunRecord, ignore: Sequence[str], observers: Collection[str] = ()) -> dict[str, Any]:
    """The run's experiment identity: the flattened scenario without the ignored keys and the
    observe-only plugins, plus its mid-run changes (if any)."""
    scenario = dict(run.scenario) or {
        # No scenario.toml: all that is known is in summary.json.
        "scenario": run.summary.get("scenario"),
    }
    scenario["plugins"] = [_without_unset(p) for p in _plugin_specs(run) if _spec_name(p) not in observers]
    flat = _flatten(scenario)
    # None is "unset": scenario.toml cannot hold it, so an unset key and a missing one are the same.
    key = {k: v for k, v in flat.items() if v is not None and not _ignored(k, ignore)}
    changes = run.changes(ignore)
    if changes:
        key[CHANGED] = changes
    return key


def _fmt_changes(changes: Sequence[Mapping[str, Any]]) -> str:
    """``round 10: train.lr=0.5; round 20: federation.rounds=80``."""
    return "; ".join(
        f"round {c.get('round')}: " + ", ".join(f"{k}={_fmt_value(k, v)}" for k, v in c["overrides"].items())
        for c in changes
    )


def _fmt_value(key: str, value: Any) -> str:
    if key == CHANGED:
        return "never" if not value else f"[{_fmt_changes(value)}]"
    if value is None:
        return "unset"
    if key == "plugins" and isinstance(value, list):
        parts = []
        for spec in value:
            if not isinstance(spec, Mapping):
                parts.append(str(spec))
                continue
            params = spec.get("params") or {}
            inner = ",".join(f"{k}={_fmt_value(k, v)}" for k, v in sorted(params.items()))
            parts.append(f"{spec.get('name')}({inner})" if inner else str(spec.get("name")))
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt_value("", v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class Group:
    """Runs of one experiment that differ only in seed.

    Attributes
    ----------
    label : str
        The settings in which this group differs from the others (``key=value, ...``), or the
        scenario name when there is one group.
    settings : dict
        Those differing settings as dotted key → value.
    runs : list of RunRecord
        Its runs, in the order given.
    changes : list of dict
        Settings its runs changed mid-run (``{"round", "overrides"}``, the same for every run of the
        group); empty for runs with one setting throughout.
    """

    label: str
    settings: dict[str, Any]
    runs: list[RunRecord]
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    def values_by_seed(self, metric: str) -> dict[int, float]:
        """Per seed, the metric (the mean over runs sharing that seed); runs without it are left out."""
        by_seed: dict[int, list[float]] = {}
        for run in self.runs:
            value = run.metric(metric)
            if run.seed is not None and value is not None:
                by_seed.setdefault(run.seed, []).append(value)
        return {s: math.fsum(v) / len(v) for s, v in by_seed.items()}


def group_runs(
    runs: Sequence[RunRecord], ignore: Sequence[str] = IGNORED_KEYS, observers: Iterable[str] | None = None
) -> list[Group]:
    """Group runs whose scenarios agree outside ``ignore``; groups in order of first appearance.

    This is the one grouping of fedlt: ``fedlt compare`` tabulates its groups and ``fedlt plot``
    draws them.

    Parameters
    ----------
    runs : sequence of RunRecord
    ignore : sequence of str
        Dotted scenario keys (and everything below them) that do not separate groups.
    observers : iterable of str, optional
        Plugin names that do not separate groups; default :func:`observer_plugins` of the plugins
        the runs use.
    """
    if observers is None:
        observers = observer_plugins(_spec_name(p) for r in runs for p in _plugin_specs(r))
    observers = set(observers)
    keyed: dict[str, tuple[dict[str, Any], list[RunRecord]]] = {}
    for run in runs:
        setting = _setting_key(run, ignore, observers)
        keyed.setdefault(_canonical(setting), (setting, []))[1].append(run)
    settings = [s for s, _ in keyed.values()]
    all_keys = sorted({k for s in settings for k in s}, key=lambda k: (k == CHANGED, k != "plugins", k))
    differing = [k for k in all_keys if len({_canonical(s.get(k)) for s in settings}) > 1]
    groups = []
    for setting, members in keyed.values():
        diff = {k: setting.get(k) for k in differing}
        if diff:
            label = ", ".join(f"{k}={_fmt_value(k, v)}" for k, v in diff.items())
        else:
            names = sorted(
                {str(r.summary.get("scenario") or r.scenario.get("name") or "runs") for r in members}
            )
            label = "/".join(names)
        diff.pop(CHANGED, None)
        groups.append(Group(label=label, settings=diff, runs=members, changes=setting.get(CHANGED, [])))
    return groups


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """One group and metric: its statistics and, unless it is the baseline, the paired difference."""

    group: str
    metric: str
    stat: Stat
    diff: Stat | None = None
    diff_seeds: tuple[int, ...] = ()


@dataclass
class ComparisonTable:
    """Statistics per group and metric, with paired differences against a baseline group.

    Attributes
    ----------
    groups : list of Group
        The groups, baseline first when there is one.
    metrics : list of str
        The metrics compared, in column order.
    rows : list of Row
        One per (metric, group), metric-major.
    baseline : str or None
        Label of the baseline group.
    notes : list of str
        What the reader should know (missing metrics, unpaired seeds, repeated seeds).
    """

    groups: list[Group]
    metrics: list[str]
    rows: list[Row]
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, group: str, metric: str) -> Row:
        """The row of ``group`` (its label) and ``metric``."""
        for r in self.rows:
            if r.group == group and r.metric == metric:
                return r
        raise KeyError((group, metric))

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain JSON-ready values (what :meth:`to_json` writes)."""
        return {
            "baseline": self.baseline,
            "metrics": list(self.metrics),
            "groups": [
                {
                    "label": g.label,
                    "settings": g.settings,
                    "runs": [str(r.path) for r in g.runs],
                    "seeds": g.seeds,
                    "changed_mid_run": g.changes,
                }
                for g in self.groups
            ],
            "rows": [
                {
                    "group": r.group,
                    "metric": r.metric,
                    **r.stat.to_dict(),
                    "diff": None if r.diff is None else {**r.diff.to_dict(), "seeds": list(r.diff_seeds)},
                }
                for r in self.rows
            ],
            "notes": list(self.notes),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    def to_csv(self) -> str:
        """Long format, one line per (group, metric): statistics then the paired difference."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        cols = ["n", "mean", "std", "ci_low", "ci_high"]
        writer.writerow(["group", "metric", *cols, *(f"diff_{c}" for c in cols)])
        for r in self.rows:
            cells: list[Any] = [r.stat.n, r.stat.mean, r.stat.std, r.stat.ci_low, r.stat.ci_high]
            d = r.diff
            cells += [None] * 5 if d is None else [d.n, d.mean, d.std, d.ci_low, d.ci_high]
            writer.writerow([r.group, r.metric, *("" if c is None else repr(c) for c in cells)])
        return buf.getvalue()

    def to_markdown(self, digits: int = 4) -> str:
        """One table per metric: n, mean, std, 95% CI and the paired difference to the baseline."""

        def f(x: float | None, signed: bool = False) -> str:
            if x is None:
                return "–"
            return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"

        def ci(s: Stat, signed: bool = False) -> str:
            return "–" if s.ci_low is None else f"[{f(s.ci_low, signed)}, {f(s.ci_high, signed)}]"

        changed = any(g.changes for g in self.groups)
        lines = ["| group | runs | seeds |", "|---|---:|---|"]
        if changed:
            lines = ["| group | runs | seeds | settings changed mid-run |", "|---|---:|---|---|"]
        for g in self.groups:
            mark = " (baseline)" if g.label == self.baseline else ""
            seeds = ", ".join("?" if s is None else str(s) for s in g.seeds)
            line = f"| {_md(g.label)}{mark} | {len(g.runs)} | {seeds} |"
            if changed:
                line += f" {_md(_fmt_changes(g.changes)) or 'no'} |"
            lines.append(line)
        for metric in self.metrics:
            lines += ["", f"### {metric}", ""]
            head = "| group | n | mean | std | 95% CI |"
            rule = "|---|---:|---:|---:|---|"
            if self.baseline is not None:
                head += " Δ vs baseline (paired) | Δ std | Δ 95% CI | pairs |"
                rule += "---:|---:|---|---:|"
            lines += [head, rule]
            for r in (r for r in self.rows if r.metric == metric):
                s = r.stat
                line = f"| {_md(r.group)} | {s.n} | {f(s.mean)} | {f(s.std)} | {ci(s)} |"
                if self.baseline is not None:
                    if r.diff is None:
                        line += " baseline | | | |"
                    else:
                        d = r.diff
                        line += f" {f(d.mean, True)} | {f(d.std)} | {ci(d, True)} | {d.n} |"
                lines.append(line)
        if self.notes:
            lines += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(lines) + "\n"

    def to_latex(self, digits: int = 4) -> str:
        """A booktabs table for a paper: one row per group, one column per metric.

        Each cell is the mean with its 95% interval in brackets (clipped to the metric's range);
        with a baseline, a second panel gives the paired differences to it over shared seeds. Labels
        are escaped for LaTeX; notes follow as ``%`` comments. Needs ``\\usepackage{booktabs}``.
        """

        def cell(st: Stat | None, signed: bool = False) -> str:
            if st is None or st.mean is None:
                return "--"
            spec = f"+.{digits}f" if signed else f".{digits}f"
            text = f"${st.mean:{spec}}$"
            if st.ci_low is not None and st.ci_high is not None:
                text += f" {{\\scriptsize $[{st.ci_low:{spec}}, {st.ci_high:{spec}}]$}}"
            return text

        def n_of(counts: set[int]) -> str:
            return str(min(counts)) if len(counts) == 1 else f"{min(counts)}--{max(counts)}"

        width = 2 + len(self.metrics)
        lines = [
            "% fedlt compare: mean and 95% Student-t interval over seeds, clipped to the metric's range",
            "% (n: runs; paired differences: seeds shared with the baseline). Needs \\usepackage{booktabs}.",
            "\\begin{tabular}{lr" + "c" * len(self.metrics) + "}",
            "\\toprule",
            " & ".join(["Group", "$n$", *(_tex(m) for m in self.metrics)]) + " \\\\",
            "\\midrule",
        ]
        for g in self.groups:
            label = _tex(g.label) + (" (baseline)" if g.label == self.baseline else "")
            cells = [cell(self.row(g.label, m).stat) for m in self.metrics]
            lines.append(" & ".join([label, str(len(g.runs)), *cells]) + " \\\\")
        if self.baseline is not None and len(self.groups) > 1:
            lines += [
                "\\midrule",
                f"\\multicolumn{{{width}}}{{l}}{{\\emph{{Paired difference to {_tex(self.baseline)}}}}} \\\\",
            ]
            for g in self.groups:
                if g.label == self.baseline:
                    continue
                rows = [self.row(g.label, m) for m in self.metrics]
                pairs = n_of({r.diff.n for r in rows if r.diff is not None} or {0})
                cells = [cell(r.diff, signed=True) for r in rows]
                lines.append(" & ".join([_tex(g.label), pairs, *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"]
        lines += [f"% {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


#: LaTeX's special characters in text mode and what prints them.
_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (labels hold ``_``, ``{``, ``%``...)."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def _fmt_range(bounds: tuple[float, float] | None) -> str:
    return "no range" if bounds is None else f"[{bounds[0]:g}, {bounds[1]:g}]"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _find_baseline(groups: Sequence[Group], baseline: str) -> Group:
    exact = [g for g in groups if g.label == baseline]
    if exact:
        return exact[0]
    partial = [g for g in groups if baseline in g.label]
    if len(partial) == 1:
        return partial[0]
    labels = "; ".join(g.label for g in groups)
    what = "matches several groups" if partial else "matches no group"
    raise ValueError(f"baseline {baseline!r} {what}; the groups are: {labels}")


def available_metrics(runs: Sequence[RunRecord]) -> list[str]:
    """The keys of ``summary["final"]`` some run holds a number (or ``null``) for: what a table can show."""
    found = {k for r in runs for k, v in r.final.items() if v is None or _number(v) is not None}
    return sorted(found)


def check_metrics(runs: Sequence[RunRecord], metrics: Sequence[str], key: str = "metrics") -> list[str]:
    """``metrics`` as a list, refused (naming ``key``) when empty or when one is a metric no run
    has: a typo would otherwise give a table of empty cells."""
    metrics = [m.strip() for m in metrics]
    have = available_metrics(runs)
    if not metrics or not all(metrics):
        among = f"a comma-separated list of metrics among {', '.join(have)}"
        raise ScenarioError(key, ",".join(metrics), among)
    unknown = [m for m in metrics if m not in have]
    if unknown:
        raise ScenarioError(
            key, ",".join(unknown), f"metrics the runs have: {', '.join(have) or 'none (no final metrics)'}"
        )
    return metrics


def check_out_path(path: str | Path, key: str, folder: bool) -> Path:
    """Refuse, before any work, an output path that cannot be written: for a ``folder`` (figures)
    an existing file, for a file (a table) an existing folder, and for either a path under a file.
    Folders missing on the way are fine (they are created when writing)."""
    path = Path(path)
    want = "a folder" if folder else "a file"
    if path.exists() and path.is_dir() != folder:
        found = "a file" if folder else "a folder"
        raise ScenarioError(key, str(path), f"{want} or a new path", hint=f"{path} is {found}.")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        hint = f"{above} is a file, not a folder."
        raise ScenarioError(key, str(path), f"{want} not under a file", hint=hint)
    return path


def compare(
    runs: Sequence[RunRecord],
    metrics: Sequence[str] | None = None,
    baseline: str | None = None,
    ignore: Sequence[str] = IGNORED_KEYS,
) -> ComparisonTable:
    """Group ``runs`` by experiment and summarise each metric, paired against ``baseline``.

    Parameters
    ----------
    runs : sequence of RunRecord
        From :func:`collect_runs`.
    metrics : sequence of str, optional
        Keys of ``summary["final"]``; default: those of :data:`DEFAULT_METRICS` that some run has.
        Taken as given (``[]``: only the groups); :func:`check_metrics` refuses ones no run has.
    baseline : str, optional
        The baseline group: its exact label, or a substring of exactly one label (``"plugins=[]"``).
        Each other group then gets, per metric, the differences group - baseline over the seeds
        both have (runs sharing a seed within a group are averaged first): their mean, std
        (ddof=1), 95% t interval and number of pairs.
    ignore : sequence of str
        Scenario keys that do not separate groups (default :data:`IGNORED_KEYS`). Plugins that only
        observe (:func:`observer_plugins`) never do; runs whose settings changed mid-run always do.

    Returns
    -------
    ComparisonTable
    """
    if not runs:
        raise ValueError("no runs to compare")
    observers = observer_plugins(_spec_name(p) for r in runs for p in _plugin_specs(r))
    groups = group_runs(runs, ignore, observers)
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if any(r.metric(m) is not None for r in runs)]
    metrics = list(metrics)
    notes: list[str] = []
    base: Group | None = None
    if baseline is not None:
        base = _find_baseline(groups, baseline)
        groups = [base, *(g for g in groups if g is not base)]
    if observers:
        notes.append(
            f"plugins that only observe (every hook in {', '.join(sorted(OBSERVER_HOOKS))}) do not separate "
            f"groups: {', '.join(sorted(observers))}."
        )
    for g in groups:
        if g.changes:
            notes.append(
                f"{g.label}: settings changed mid-run ({_fmt_changes(g.changes)}); kept apart from runs "
                "that ran with one setting throughout."
            )
        seeds = [s for s in g.seeds if s is not None]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            notes.append(f"{g.label}: seeds {repeated} occur in several runs; paired values use their mean.")
    rows: list[Row] = []
    for metric in metrics:
        bounds = metric_bounds(metric)
        for g in groups:
            values = [v for v in (r.metric(metric) for r in g.runs) if v is not None]
            missing = len(g.runs) - len(values)
            if missing:
                notes.append(f"{g.label}: {missing} of {len(g.runs)} runs have no {metric}.")
            row = Row(g.label, metric, summarize(values, bounds))
            if row.stat.clipped:
                notes.append(f"{g.label}: the 95% interval of {metric} is clipped to {_fmt_range(bounds)}.")
            if base is not None and g is not base:
                mine, theirs = g.values_by_seed(metric), base.values_by_seed(metric)
                common = tuple(sorted(set(mine) & set(theirs)))
                row.diff = summarize((mine[s] - theirs[s] for s in common), difference_bounds(bounds))
                row.diff_seeds = common
                if not common and values:
                    notes.append(
                        f"{g.label}: no seed shared with the baseline for {metric}; no paired difference."
                    )
            rows.append(row)
    return ComparisonTable(groups, metrics, rows, None if base is None else base.label, notes)
